"""Why the served model declares no input schema (#23): MLflow's enforcement of any AnyType schema
rejects input forms the model accepts. If MLflow changes that, these fail and the schema can be declared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.models.utils import _enforce_schema
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

JPEG = b"\xff\xd8\xff\xe0 stand-in bytes: enforcement runs before any decoding"
GRAY = np.zeros((57, 33), dtype=np.uint8)
RGB = np.zeros((32, 90, 3), dtype=np.uint8)


def _rejected(form: object, schema: Schema) -> bool:
    """Whether MLflow's schema enforcement (what load_model applies before predict) refuses the form."""
    try:
        _enforce_schema(form, schema)
    except Exception:  # noqa: BLE001 - MLflow raises several types; any refusal counts
        return True
    return False


@pytest.mark.parametrize(
    ("schema", "forms"),
    [
        # Named column: even a plain list of bytes and a base64 list are refused.
        (Schema([ColSpec(AnyType(), "image")]), [JPEG, [JPEG], pd.Series([JPEG]), [GRAY, RGB]]),
        # Unnamed column: tuples, bytearray and lists of differently sized arrays are refused.
        (Schema([ColSpec(AnyType())]), [(JPEG,), bytearray(JPEG), [GRAY, RGB], np.stack([GRAY, GRAY])]),
    ],
    ids=["named-any", "unnamed-any"],
)
def test_an_any_type_schema_would_refuse_forms_the_model_accepts(schema, forms):
    refused = [type(form).__name__ for form in forms if _rejected(form, schema)]
    assert refused == [type(form).__name__ for form in forms]


def test_without_a_schema_nothing_is_refused_before_predict():
    # The served model's signature (packaging._pyfunc_spec) has inputs=None: predict() checks items itself.
    from mlflow.pyfunc import _validate_prediction_input

    for form in (JPEG, (JPEG,), bytearray(JPEG), [GRAY, RGB], np.stack([GRAY, GRAY]), {"image": [JPEG]}):
        data, _ = _validate_prediction_input(form, None, None, None)
        assert data is form
