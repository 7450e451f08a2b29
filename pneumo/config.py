"""Typed configuration: what to train (TrainConfig) apart from where things live (Settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_NAMES: tuple[str, ...] = ("dense", "cnn", "cnn_deep", "vgg16")


class TrainConfig(BaseModel):
    """Everything that decides what a training run produces. Defaults are the seed article's."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(120, ge=16, le=512, description="Square input side in pixels.")
    batch_size: int = Field(32, ge=1, le=1024)
    epochs: int = Field(20, ge=1, le=500)
    seed: int = Field(42, ge=0)
    learning_rate: float | None = Field(
        None, gt=0, lt=1, description="Override the model's own seed learning rate."
    )
    class_weights: bool = Field(True, description="Weight the loss by inverse class frequency.")
    early_stopping: bool = Field(False, description="Stop when validation loss stops improving.")
    patience: int = Field(3, ge=1, le=100)
    augment: bool = Field(True, description="Seed augmentation (shear 0.2, zoom 0.2) on train only.")
    mixed_precision: bool = Field(True, description="float16 compute on a GPU; ignored on CPU.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of train patients held out.")
    recall_target: float = Field(0.95, gt=0, le=1, description="Threshold tuning target on validation.")
    score_weight: float = Field(2.0, ge=0, le=100, description="w in (w*recall + specificity)/(w+1).")
    vgg16_weights: str = Field(
        "imagenet",
        description="'imagenet' (Keras cache file), 'auto' (that file if present, else random), "
        "a path to the no-top .h5 file, or 'none'.",
    )

    @field_validator("vgg16_weights")
    @classmethod
    def _weights_spec(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("vgg16_weights must be 'imagenet', 'none' or a file path")
        return value.strip()


class Settings(BaseSettings):
    """Where things live; read from the environment (``PNEUMO_*``) so secrets stay out of configs."""

    model_config = SettingsConfigDict(env_prefix="PNEUMO_", extra="ignore")

    home: Path = Field(Path(".pneumo"), description="Local working folder (cache, outputs).")
    tracking_uri: str = Field(
        "sqlite:///.pneumo/mlflow.db",
        validation_alias=AliasChoices("PNEUMO_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI.",
    )
    experiment: str = "pneumonia-retraining"
    registered_model: str = "pneumonia-classifier"
    s3_endpoint_url: str | None = Field(
        None, description="Explicit S3 endpoint (MinIO); AWS_ENDPOINT_URL_S3 also works."
    )


class RetrainParams(BaseModel):
    """The retraining flow's one parameter (validated by Prefect for ``deployment run --param``)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(".pneumo/demo-data", description="s3://bucket/prefix, file:// URI or local folder.")
    candidates: list[Literal["dense", "cnn", "cnn_deep", "vgg16"]] = Field(
        default_factory=lambda: list(MODEL_NAMES), min_length=1, description="Models to train."
    )
    epochs: int = Field(20, ge=1, le=500)
    image_size: int = Field(120, ge=32, le=512)
    batch_size: int = Field(32, ge=1, le=1024)
    seed: int = Field(42, ge=0)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    early_stopping: bool = False
    vgg16_weights: str = "imagenet"
    recall_target: float = Field(0.95, gt=0, le=1, description="Validation recall the threshold keeps.")
    score_weight: float = Field(2.0, ge=0, le=100)
    min_recall: float = Field(0.95, ge=0, le=1, description="Promotion floor on test recall.")
    min_specificity: float = Field(0.0, ge=0, le=1, description="Promotion floor on test specificity.")
    margin: float = Field(0.0, ge=-1, le=1, description="Score the challenger must beat the champion by.")
    registered_model: str = Field("pneumonia-classifier", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    tracking_uri: str | None = Field(None, description="MLflow URI; default: the worker's settings.")
    experiment: str | None = Field(None, description="MLflow experiment; default: the worker's settings.")
    min_images_per_class: int = Field(2, ge=1, description="Fail early below this per subset and class.")

    @field_validator("candidates")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"candidates must not repeat: {value}")
        return value

    def train_config(self) -> TrainConfig:
        """The shared training config every candidate uses."""
        return TrainConfig(
            image_size=self.image_size, batch_size=self.batch_size, epochs=self.epochs, seed=self.seed,
            val_fraction=self.val_fraction, early_stopping=self.early_stopping,
            vgg16_weights=self.vgg16_weights, recall_target=self.recall_target, score_weight=self.score_weight,
        )
