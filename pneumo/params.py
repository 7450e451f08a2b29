"""The flows' parameters (retraining, dataset watch), validated before any work starts.

Model names come from :mod:`pneumo.training.models`, imported only when a name is validated
(it imports Keras, which costs seconds).
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pneumo.config import REGISTERED_MODEL_PATTERN, Gate, Settings, Strict, TrainConfig


def _refuse_credentials(value: str | None) -> str | None:
    from pneumo.errors import has_credentials

    if value is not None and has_credentials(value):
        # Parameters are stored (Prefect, MLflow params): credentials must come from the environment.
        raise ValueError("tracking_uri must not carry credentials; set MLFLOW_TRACKING_USERNAME/PASSWORD "
                         "or MLFLOW_TRACKING_TOKEN on the worker instead")
    return value


def _checked_source(value: str) -> str:
    """A source :func:`~pneumo.data.storage.parse_source` accepts, refused without echoing a secret."""
    from pneumo.data.storage.sources import parse_source
    from pneumo.errors import StorageError, has_credentials

    if has_credentials(value):
        # Stored like tracking_uri; no scheme takes credentials in the URI (s3:// has its credential chain).
        raise ValueError("source must not carry credentials; for s3:// give the worker AWS credentials "
                         "(env vars, profile, role); file:// URIs and folders take none")
    try:
        parse_source(value)  # an unsupported scheme or a bad bucket fails here, not after the flow started
    except StorageError as error:  # pydantic reports ValueErrors as validation errors
        raise ValueError(str(error)) from None
    return value


def _all_models() -> list[str]:
    from pneumo.training.models import list_models

    return list_models()


class RetrainParams(Strict):
    """The retraining flow's one parameter (validated by Prefect for ``deployment run --param``)."""

    source: str = Field(".pneumo/demo-data", description="s3://bucket/prefix, file:// URI or local folder.")
    candidates: list[str] = Field(default_factory=_all_models, min_length=1, description="Models to train.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    gate: Gate = Field(default_factory=Gate)
    registered_model: str | None = Field(
        None, pattern=REGISTERED_MODEL_PATTERN, description="Registered model; default: the worker's settings.")
    tracking_uri: str | None = Field(None, description="MLflow URI; default: the worker's settings.")
    experiment: str | None = Field(None, description="MLflow experiment; default: the worker's settings.")
    min_images_per_class: int = Field(2, ge=1, description="Fail early below this per subset and class.")
    force: bool = Field(False, description="Train even when the dataset, parameters and code equal the last "
                                           "finished retraining's (otherwise that retraining is skipped).")

    @field_validator("candidates")
    @classmethod
    def _known_and_unique(cls, value: list[str]) -> list[str]:
        from pneumo.errors import ModelError
        from pneumo.training.models import model_spec

        if len(set(value)) != len(value):
            raise ValueError(f"candidates must not repeat: {value}")
        for name in value:
            try:
                model_spec(name)
            except ModelError as error:  # pydantic reports ValueErrors as validation errors
                raise ValueError(str(error)) from None
        return value

    _no_credentials = field_validator("tracking_uri")(_refuse_credentials)
    _valid_source = field_validator("source")(_checked_source)

    @model_validator(mode="after")
    def _image_size_fits_every_candidate(self) -> RetrainParams:
        from pneumo.training.models import model_spec

        too_small = [f"{name} needs ≥ {model_spec(name).min_image_size}" for name in self.candidates
                     if self.train.image_size < model_spec(name).min_image_size]
        if too_small:
            raise ValueError(f"train.image_size {self.train.image_size} is too small: {', '.join(too_small)}")
        return self

    def resolved(self, settings: Settings) -> RetrainParams:
        """A copy with the worker's settings filled in where the parameter left them unset."""
        return self.model_copy(update={
            "tracking_uri": self.tracking_uri or settings.tracking_uri,
            "experiment": self.experiment or settings.experiment,
            "registered_model": self.registered_model or settings.registered_model,
        })


class WatchParams(Strict):
    """The dataset watch's one parameter: which source, compared with which experiment's retrainings."""

    source: str = Field(".pneumo/demo-data", description="s3://bucket/prefix, file:// URI or local folder.")
    tracking_uri: str | None = Field(None, description="MLflow URI; default: the worker's settings.")
    experiment: str | None = Field(None, description="MLflow experiment; default: the worker's settings.")
    settle_seconds: float = Field(60.0, ge=0, le=3600, description="List twice this far apart and emit only "
                                                                     "when both agree (an upload still going waits).")

    _no_credentials = field_validator("tracking_uri")(_refuse_credentials)
    _valid_source = field_validator("source")(_checked_source)

    def resolved(self, settings: Settings) -> WatchParams:
        """A copy with the worker's settings filled in where the parameter left them unset."""
        return self.model_copy(update={"tracking_uri": self.tracking_uri or settings.tracking_uri,
                                       "experiment": self.experiment or settings.experiment})
