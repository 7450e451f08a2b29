"""A real ``mlflow server`` on 127.0.0.1: sqlite backend in tmp, artifacts proxied to the S3 test server.

Fixtures:
    mlflow_server (session): a running server; see :class:`MlflowServer`. Tests share it, so
        each should use its own experiment and registered-model names (``unique_name``).
    mlflow_uri (function): the server's URI, also set as ``MLFLOW_TRACKING_URI`` for the test.
    unique_name (function): ``unique_name("prefix")`` → a name no other test uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.plugins.processes import free_port, stop_process, wait_http


def mlflow_executable() -> str:
    """The ``mlflow`` console script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "mlflow"
    return str(candidate) if candidate.exists() else "mlflow"


class MlflowServer:
    """An ``mlflow server`` subprocess.

    Attributes:
        uri: ``http://127.0.0.1:PORT`` (the tracking and registry URI).
        artifacts_destination: where the server stores artifacts (``s3://bucket/mlartifacts``).
        log: the server's combined stdout/stderr file.
    """

    def __init__(self, process: subprocess.Popen[Any], port: int, artifacts_destination: str, log: Path) -> None:
        self.process = process
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.artifacts_destination = artifacts_destination
        self.log = log

    @classmethod
    def start(
        cls, workdir: Path, artifacts_destination: str, env: dict[str, str], *, workers: int = 2,
        attempts: int = 3,
    ) -> MlflowServer:
        """Start the server on a free port and wait until ``/health`` answers."""
        workdir.mkdir(parents=True, exist_ok=True)
        last: Exception | None = None
        for attempt in range(attempts):
            port = free_port()
            log = workdir / f"mlflow-server-{attempt}.log"
            command = [
                mlflow_executable(), "server",
                "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                "--artifacts-destination", artifacts_destination,
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            ]
            with log.open("wb") as sink:
                process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                           env={**os.environ, **env}, cwd=workdir, start_new_session=True)
            try:
                wait_http(f"http://127.0.0.1:{port}/health", process, timeout=120, log=log)
                return cls(process, port, artifacts_destination, log)
            except RuntimeError as error:  # e.g. the port was taken between free_port() and bind
                last = error
                stop_process(process)
        raise RuntimeError(f"could not start mlflow server: {last}")

    def stop(self) -> None:
        """Terminate the server."""
        stop_process(self.process)


if "pytest" in sys.modules:
    import pytest

    @pytest.fixture(scope="session")
    def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> Iterator[MlflowServer]:
        """One MLflow server for the session, artifacts in a bucket on the moto S3 server."""
        bucket = s3_server.make_bucket("mlflow")
        env = {
            **s3_server.env,
            "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
            # Keep the server's own outbound S3 calls from reading a developer's ~/.aws files.
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        server = MlflowServer.start(tmp_path_factory.mktemp("mlflow-server"), f"s3://{bucket}/mlartifacts", env)
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def mlflow_uri(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> str:
        """The shared server's URI, set as the process-wide MLflow tracking URI for this test."""
        import mlflow

        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mlflow.set_tracking_uri(mlflow_server.uri)
        return mlflow_server.uri

    @pytest.fixture
    def unique_name() -> Callable[[str], str]:
        """Factory of names unique to this test (experiments, registered models)."""
        return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:10]}"


# ----------------------------------------------------------------------------- models and images
# Tracking, registry and serving tests need models whose quality they control. A "brightness
# model" scores an image by its mean gray level (NORMAL test images are dark, PNEUMONIA bright),
# so the stored threshold alone decides how good a candidate is on the test set.
STEEPNESS = 12.0


def xray_jpeg(brightness: float, size: int = 40, seed: int = 0, rgb: bool = False) -> bytes:
    """A small noisy JPEG whose mean gray level is about ``brightness`` (0..255)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(brightness, 6.0, (size, size + 8)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "L")
    buffer = io.BytesIO()
    (image.convert("RGB") if rgb else image).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def brightness_model(image_size: int = 32) -> Any:
    """Compiled Keras model: p = sigmoid(STEEPNESS·(mean pixel/255 − 0.5)); input float 0..255."""
    import keras
    import numpy as np

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(1, activation="sigmoid", name="pneumonia_probability")
    model = keras.Model(inputs, dense(x))
    dense.set_weights([np.full((3, 1), STEEPNESS / 3, dtype=np.float32),
                       np.array([-STEEPNESS / 2], dtype=np.float32)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    return model


def threshold_for(brightness: float) -> float:
    """The brightness model's probability at a gray level: images brighter than it are PNEUMONIA."""
    import math

    return 1.0 / (1.0 + math.exp(-STEEPNESS * (brightness / 255.0 - 0.5)))


def labelled_images(normal: int = 10, pneumonia: int = 10, seed: int = 0) -> tuple[list[bytes], list[int]]:
    """Test-set stand-in: NORMAL at gray levels 40..120, PNEUMONIA at 136..216 (JPEG bytes, labels)."""
    import numpy as np

    normal_levels = np.linspace(40, 120, normal)
    pneumonia_levels = np.linspace(136, 216, pneumonia)
    images = [xray_jpeg(level, seed=seed + i) for i, level in enumerate(normal_levels)]
    images += [xray_jpeg(level, seed=seed + 100 + i) for i, level in enumerate(pneumonia_levels)]
    return images, [0] * normal + [1] * pneumonia


def log_retraining(uri: str, experiment: str, model: Any, candidates: dict[str, tuple[float, float]],
                   source: str = "s3://bucket/chest_xray", fingerprint: str = "f" * 64) -> str:
    """A finished retraining run with one child per ``name: (threshold, validation score)``, all one model."""
    from pneumo.config import TrainConfig
    from pneumo.pipeline import CandidateResult
    from pneumo.promotion import tracking

    config = TrainConfig(image_size=int(model.input_shape[1]), epochs=1)
    parent = tracking.start_retraining(uri, experiment, source, fingerprint, config)
    for name, (threshold, score) in candidates.items():
        metrics = {"recall": 1.0, "specificity": 0.5, "threshold": threshold}
        result = CandidateResult(name=name, status="ok", threshold=threshold, score=score, validation=metrics,
                                 test=metrics, history={"loss": [0.7, 0.6]}, model=model)
        tracking.log_candidate(tracking.start_candidate(parent, name, tracking_uri=uri), result, config,
                               tracking_uri=uri)
    tracking.finish_retraining(parent, tracking_uri=uri)
    return parent
