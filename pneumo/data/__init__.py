"""Data: which files are dataset images, decoding, the manifest and its splits, the input pipeline, generated data.

Entry points: :mod:`.layout` (``classify``, ``CLASSES``), :func:`.decode.decode_image`,
:mod:`.images` (``validate_images``, ``assign_subsets``, ``class_weights``, ``make_dataset``),
:func:`.synthetic.generate_dataset`, and :mod:`.storage` (``sync``, ``materialized``, ``upload_tree``).
"""
