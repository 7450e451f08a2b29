"""Model logging: the Keras network and the served pyfunc, packaged from code (nothing pickled)."""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumo.data.layout import CLASSES
from pneumo.serving.pyfunc import INPUT_COLUMN, KERAS_ARTIFACT

KERAS_MODEL_NAME = "model"
SERVING_MODEL_NAME = "serving_model"
# Logged models are named "<candidate>-<role>" (cnn-serving, cnn-keras) so the experiment's Models tab
# tells them apart (#27, item 2); everything else finds them by URI (models:/<id>), never by name.
# Distributions the served model imports; pinned to what logged it so a fresh env matches.
_REQUIREMENTS: tuple[tuple[str, ...], ...] = (
    ("mlflow", "mlflow-skinny"), ("tensorflow", "tensorflow-cpu"), ("keras",), ("numpy",),
    ("pandas",), ("pillow",),
)
# MLflow's models-from-code entry point: loading the model runs this file instead of unpickling.
_MODEL_CODE = '''"""pneumo's served model, defined from code so that loading it unpickles nothing."""
from mlflow.models import set_model

from pneumo.serving.pyfunc import PneumoniaClassifier

set_model(PneumoniaClassifier())
'''


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model, from the versions installed here."""
    pins = []
    for names in _REQUIREMENTS:
        for name in names:  # the first one installed
            with suppress(importlib.metadata.PackageNotFoundError):
                pins.append(f"{name}=={importlib.metadata.version(name)}")
                break
    return pins


def example_image(image_size: int = 32) -> bytes:
    """A small gray PNG used as the logged input example."""
    from PIL import Image

    ramp = np.linspace(0, 255, image_size * image_size).reshape(image_size, image_size).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def _pyfunc_spec(model: Any, *, threshold: float, image_size: int, candidate: str,
                 calibration: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Keyword arguments of ``mlflow.pyfunc`` save/log for our served model (files live while open)."""
    import keras
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import pneumo

    # No input schema on purpose (checked against MLflow 3.17, #23; tests/serving/test_signature.py):
    # load_model enforces any declared schema before predict() runs, and no AnyType schema keeps every
    # accepted form. A named ColSpec(AnyType(), "image") rejects bytes, lists, Series, base64 lists
    # and arrays; an unnamed ColSpec(AnyType()) rejects tuples, bytearray, lists of differently sized
    # arrays, single and stacked arrays, and the REST body {"inputs": {"image": [...]}}. predict()
    # validates every item itself and names the bad one; the logged input example shows the format.
    outputs = Schema([ColSpec("double", "probability"), ColSpec("string", "label"),
                      ColSpec("string", "heatmap", required=False)])
    signature = ModelSignature(inputs=None, outputs=outputs,
                               params=ParamSchema([ParamSpec("explain", "boolean", False)]))
    with tempfile.TemporaryDirectory(prefix="pneumo-serving-") as tmp:
        # The network without its optimizer: serving never trains, and loading skips no optimizer state.
        inference = keras.models.clone_model(model)
        inference.set_weights(model.get_weights())
        keras_file = Path(tmp) / "model.keras"
        inference.save(keras_file)
        code_file = Path(tmp) / "served_model.py"
        code_file.write_text(_MODEL_CODE)
        config = {"threshold": float(threshold), "image_size": int(image_size), "candidate": candidate,
                  "classes": list(CLASSES), "calibration": dict(calibration or {"method": "identity"})}
        yield {
            "python_model": str(code_file), "artifacts": {KERAS_ARTIFACT: str(keras_file)}, "model_config": config,
            "code_paths": [os.path.dirname(pneumo.__file__)], "signature": signature,
            "pip_requirements": pip_requirements(), "metadata": {"pneumo": json.dumps(config)},
        }


def save_serving_model(path: Path, model: Any, *, threshold: float, image_size: int, candidate: str,
                       calibration: dict[str, Any] | None = None) -> Path:
    """Save the served pyfunc to a local folder (tests, benchmarks, offline use)."""
    import mlflow.pyfunc

    with _pyfunc_spec(model, threshold=threshold, image_size=image_size, candidate=candidate,
                      calibration=calibration) as spec:
        mlflow.pyfunc.save_model(str(path), **spec)
    return Path(path)


def logged_model_name(candidate: str | None, role: str) -> str:
    """``<candidate>-<role>``, or the old fixed name where the caller does not say the candidate."""
    if not candidate:
        return {"serving": SERVING_MODEL_NAME, "keras": KERAS_MODEL_NAME}[role]
    return f"{candidate}-{role}"


def _logged_model_id(client: Any, run_id: str, name: str) -> str:
    """A logged model created in the run's own experiment (MLflow would otherwise use experiment 0)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    return client.create_logged_model(experiment_id, name=name, source_run_id=run_id).model_id


def log_serving_model(client: Any, run_id: str, model: Any, *, threshold: float, image_size: int,
                      candidate: str, calibration: dict[str, Any] | None = None) -> str:
    """Log the served pyfunc to a run (explicit run id: safe from concurrent threads); returns its URI."""
    import mlflow.pyfunc
    from mlflow.models import Model

    example = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(example_image()).decode("ascii")]})
    with _pyfunc_spec(model, threshold=threshold, image_size=image_size, candidate=candidate,
                      calibration=calibration) as spec:
        name = logged_model_name(candidate, "serving")
        info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                         model_id=_logged_model_id(client, run_id, name),
                         input_example=example, **spec)
    return info.model_uri


class _KerasFlavor:
    """``mlflow.keras`` with the model folder created first: MLflow 3.17's ``save_model`` writes the
    input example before it creates the folder, so logging with an example fails with FileNotFoundError."""

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs: Any) -> Any:
        import mlflow.keras

        os.makedirs(path, exist_ok=True)
        return mlflow.keras.save_model(path=path, **kwargs)


def log_keras_model(client: Any, run_id: str, model: Any, image_size: int, candidate: str | None = None) -> str:
    """Log the bare Keras network (``mlflow.keras`` flavor) with a tensor signature and an example; returns its URI."""
    import keras
    from mlflow.models import Model, infer_signature

    # MLflow calls model.predict on the example; its progress bar would land in the flow's output.
    keras.config.disable_interactive_logging()
    example = np.full((1, image_size, image_size, 3), 128.0, dtype=np.float32)
    signature = infer_signature(example, np.asarray(model.predict_on_batch(example), dtype=np.float32))
    name = logged_model_name(candidate, "keras")
    info = Model.log(artifact_path=None, name=name, flavor=_KerasFlavor, run_id=run_id, model=model,
                     model_id=_logged_model_id(client, run_id, name), signature=signature,
                     input_example=example, pip_requirements=pip_requirements())
    return info.model_uri


def link_registered_version(client: Any, logged_model_id: str, name: str, version: str | int) -> None:
    """Record on the logged model that registry version ``name``/``version`` uses it, as
    ``mlflow.register_model`` does: ``create_model_version(..., model_id=...)`` skips this tag, and
    the experiment's Models tab reads its "Registered models" column from it (#27, item 2)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    existing = client.get_logged_model(logged_model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    links = json.loads(existing) if existing else []
    entry = {"name": name, "version": int(version)}  # a JSON number, as register_model writes it
    if entry not in links:  # idempotent: a retried promotion links once
        client.set_logged_model_tags(logged_model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links + [entry])})


def unlink_registered_version(client: Any, logged_model_id: str, name: str, version: str | int) -> None:
    """Undo :func:`link_registered_version` (a failed promotion deleted the version): the Models tab must not
    show a version that no longer exists."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    existing = client.get_logged_model(logged_model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    links = json.loads(existing) if existing else []
    kept = [link for link in links if link != {"name": name, "version": int(version)}]
    if kept != links:
        client.set_logged_model_tags(logged_model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(kept)})
