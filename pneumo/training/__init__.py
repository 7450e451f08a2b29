"""Training: the seed's four architectures, one candidate's fit, and the memory a retraining needs.

Entry points: :mod:`.models` (``build_model``, ``model_spec``, ``list_models``; a new model registers
here), :func:`.train.train_candidate`, :func:`.memory.estimate_memory` and :func:`.memory.check_fits`.
"""
