"""The smoke test a registry version passes before it serves: its own logged example and a fixed reference image."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from typing import Any

import numpy as np

from pneumo.data.layout import CLASSES
from pneumo.errors import ServingError
from pneumo.serving.pyfunc import INPUT_COLUMN


class ModelRefused(ServingError):
    """A registry version failed a step before serving (download, load, smoke test); the message says which."""


@functools.lru_cache(maxsize=1)
def reference_image() -> bytes:
    """A fixed 256×256 gray JPEG shaped like a chest film (bright body, darker lungs), made here, never downloaded.

    A JPEG on purpose: the logged input example is a PNG, so the two together exercise both decoders.
    """
    from PIL import Image

    y, x = np.mgrid[-1:1:256j, -1:1:256j]
    body = np.clip(1.2 - (x / 0.9) ** 2 - (y / 1.1) ** 2, 0, 1)
    lungs = sum(np.exp(-(((x - cx) / 0.25) ** 2 + ((y + 0.1) / 0.45) ** 2)) for cx in (-0.4, 0.4))
    pixels = np.clip(255 * (0.15 + 0.75 * body - 0.45 * lungs), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def reference_request() -> str:
    """The reference image as an ``/invocations`` JSON body (MLflow's ``inputs`` form)."""
    return json.dumps({"inputs": {INPUT_COLUMN: [base64.b64encode(reference_image()).decode("ascii")]}})


def _check_predictions(body: str, what: str) -> None:
    """Every row a finite probability in 0..1 and one of our labels, else :class:`ModelRefused`."""
    rows = json.loads(body).get("predictions")
    if not isinstance(rows, list) or not rows:
        raise ModelRefused(f"{what}: no predictions in the answer")
    for index, row in enumerate(rows):
        probability = row.get("probability") if isinstance(row, dict) else None
        if not isinstance(probability, (int, float)) or not math.isfinite(probability) or not 0 <= probability <= 1:
            raise ModelRefused(f"{what}: row {index} has no valid probability (got {probability!r})")
        if row.get("label") not in CLASSES:
            raise ModelRefused(f"{what}: row {index} has label {row.get('label')!r}, not one of {list(CLASSES)}")


def smoke_test(model: Any, serving_example: str | None) -> None:
    """Score the version's logged serving example and the reference image through MLflow's ``invocations``.

    The same code path a client request takes (parsing, schema, predict, JSON), so a version that
    passes answers requests of those forms.

    Raises:
        ModelRefused: no logged example, an error or a non-200 answer, or an invalid prediction.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import CONTENT_TYPE_JSON, invocations

    if not serving_example:
        raise ModelRefused("the model has no logged input example to smoke-test with")
    schema = model.metadata.get_input_schema()
    for what, body in (("its logged input example", serving_example), ("the reference image", reference_request())):
        try:
            answer = invocations(body, CONTENT_TYPE_JSON, model, schema)
        except MlflowException as error:
            raise ModelRefused(f"{what} failed: {' '.join(error.message.split())[:300]}") from None
        except Exception as error:  # noqa: BLE001 - any failure refuses the version, with its reason
            raise ModelRefused(f"{what} failed: {type(error).__name__}: {str(error)[:300]}") from None
        if answer.status != 200:
            raise ModelRefused(f"{what} answered HTTP {answer.status}: {str(answer.response)[:300]}")
        _check_predictions(answer.response, what)
