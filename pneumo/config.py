"""Typed configuration: what a training run and the gate do, apart from where things live (Settings).

Every default is written once, here or in :mod:`pneumo.params` (the retraining's one parameter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REGISTERED_MODEL = "pneumonia-classifier"
REGISTERED_MODEL_PATTERN = r"^[A-Za-z0-9_.\-]+$"


class Strict(BaseModel):
    """Unknown keys fail (a typo in ``--param`` must not be ignored); NaN and infinity never pass.

    Errors do not echo the input: a refused value may be a secret (a credentialed URI).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)


class TrainConfig(Strict):
    """Everything that decides what a training run produces. Defaults are the seed article's."""

    image_size: int = Field(120, ge=32, le=512, description="Square input side in pixels.")
    batch_size: int = Field(32, ge=1, le=1024)
    epochs: int = Field(20, ge=1, le=500)
    seed: int = Field(42, ge=0, le=2**32 - 1)  # NumPy and TensorFlow take 32-bit seeds
    learning_rate: float | None = Field(None, gt=0, lt=1, description="Override every model's seed learning rate.")
    class_weights: bool = Field(True, description="Weight the loss by inverse class frequency.")
    early_stopping: bool = Field(False, description="Stop when validation loss stops improving.")
    patience: int = Field(3, ge=1, le=100, description="Epochs without improvement before early stopping.")
    augment: bool = Field(True, description="Seed augmentation (shear 0.2, zoom 0.2) on train only.")
    mixed_precision: bool = Field(True, description="float16 compute on a GPU; ignored on CPU.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of train patients held out.")
    recall_target: float = Field(0.95, gt=0, le=1, description="Validation recall the tuned threshold keeps.")
    vgg16_weights: str = Field("imagenet", description="'imagenet' (Keras cache file), 'auto' (that file if "
                               "present, else random), a path to the no-top .h5 file, or 'none'.")

    @field_validator("vgg16_weights")
    @classmethod
    def _weights_spec(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("vgg16_weights must be 'imagenet', 'auto', 'none' or a file path")
        return value.strip()


class Gate(Strict):
    """Promotion gate: floors on test metrics, then a paired test of the score against the champion."""

    min_recall: float = Field(0.95, ge=0, le=1, description="Floor on test recall at the tuned threshold.")
    min_specificity: float = Field(0.0, ge=0, le=1, description="Floor on test specificity.")
    floors_on: Literal["lower-bound", "point"] = Field(
        "lower-bound", description="Apply the floors to the 95 % interval's lower bound, or to the point estimate.")
    margin: float = Field(0.0, ge=0, le=1, description="Score difference the paired test must clear.")
    mode: Literal["superiority", "non-inferiority"] = Field(
        "superiority", description="superiority: the interval's lower bound > margin; "
        "non-inferiority: > -margin (take the newer data's model unless it is worse).")
    score_weight: float = Field(2.0, ge=0, le=100, description="w in the score (w·recall + specificity)/(w+1).")
    replicates: int = Field(2000, ge=200, le=100_000, description="Bootstrap replicates (patients resampled).")
    approval: Literal["none", "required"] = Field(
        "none", description="required: a candidate that passes the gate waits for a person to approve it in the "
        "Prefect UI before champion moves (none: promoted unattended, as in the demo and CI).")
    approval_timeout: int = Field(
        86_400, ge=1, le=30 * 86_400, description="Seconds to wait for that approval (1 s to 30 days); no answer "
        "in time counts as a rejection: the version is registered as challenger.")


class Settings(BaseSettings):
    """Where things live; read from the environment (``PNEUMO_*``) so secrets stay out of configs."""

    model_config = SettingsConfigDict(env_prefix="PNEUMO_", extra="ignore")

    home: Path = Field(Path(".pneumo"), description="Local working folder (cache, outputs).")
    # "~/x" from a quoted shell value: the user's home, never a literal "./~" folder.
    _expand_home = field_validator("home")(lambda value: Path(value).expanduser())
    tracking_uri: str = Field("sqlite:///.pneumo/mlflow.db", description="MLflow tracking URI.",
                              validation_alias=AliasChoices("PNEUMO_TRACKING_URI", "MLFLOW_TRACKING_URI"))
    experiment: str = "pneumonia-retraining"
    registered_model: str = Field(DEFAULT_REGISTERED_MODEL, pattern=REGISTERED_MODEL_PATTERN)
    mlflow_ui_url: str | None = Field(
        None, description="The MLflow UI's address for the links in Prefect artifacts and model cards; default: the "
        "tracking server's address, or http://127.0.0.1:5000 (`mlflow ui`) for a local store.")
    s3_endpoint_url: str | None = Field(
        None, description="Explicit S3 endpoint (MinIO); AWS_ENDPOINT_URL_S3 also works.")
    parallel_candidates: int = Field(4, ge=1, le=64, description="Candidates trained at once on the local "
                                                                "thread runner (a Dask cluster runs one per worker).")
    tf_threads: int | None = Field(
        None, ge=1, description="TensorFlow intra-op threads per worker process (several workers per machine).")
