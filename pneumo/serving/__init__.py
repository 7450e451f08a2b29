"""Serving: the pyfunc model downstream apps load from the registry, how it is logged, and ``pneumo serve``.

Entry points: :class:`.pyfunc.PneumoniaClassifier`, :mod:`.packaging` (``log_serving_model``,
``log_keras_model``, ``save_serving_model``) and :func:`.server.serve` (the alias-following REST
server; :class:`.follower.AliasFollower` loads, smoke-tests (:mod:`.smoke`) and swaps versions,
:mod:`.webhook` registers and verifies MLflow's alias webhook).
"""


def __getattr__(name: str) -> object:
    # Models logged before the stage layout load ``pneumo.serving.PneumoniaClassifier`` from code.
    if name == "PneumoniaClassifier":
        from pneumo.serving.pyfunc import PneumoniaClassifier

        return PneumoniaClassifier
    raise AttributeError(name)
