"""Serving: the pyfunc model downstream apps load from the registry, and how it is logged.

Entry points: :class:`.pyfunc.PneumoniaClassifier` and :mod:`.packaging` (``log_serving_model``,
``log_keras_model``, ``save_serving_model``).
"""


def __getattr__(name: str) -> object:
    # Models logged before the stage layout load ``pneumo.serving.PneumoniaClassifier`` from code.
    if name == "PneumoniaClassifier":
        from pneumo.serving.pyfunc import PneumoniaClassifier

        return PneumoniaClassifier
    raise AttributeError(name)
