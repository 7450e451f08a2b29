"""``make demo``: the retraining flow end to end on a generated dataset, local sqlite MLflow and local Prefect.

Prints the leaderboard, the promotion decision with the numbers it compared, time and CPU, and how to open both UIs.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

HOME = Path(os.environ.get("PNEUMO_HOME", ".pneumo")).resolve()
DEMO_DEFAULTS = {
    "PNEUMO_HOME": str(HOME),
    "PNEUMO_TRACKING_URI": f"sqlite:///{HOME / 'mlflow.db'}",
    "PREFECT_HOME": str(HOME / "prefect"),
    # Prefect's local API server can take 15-20 s to start on 2 cores; its default limit is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Its telemetry service races the flow for the sqlite database and prints a "database is
    # locked" traceback that reads like a failure; the demo needs neither.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow's INFO lines ("Validating input example ...") are for debugging
}
# Library messages a newcomer would take for failures; none of them is one here.
QUIET_WARNINGS = (
    r"Hint: Inferred schema contains integer column",  # MLflow, about the manifest's label column
    r".*`shuffle=True` was passed",
    r"Your input ran out of data",  # Keras, at the end of every epoch of a finite dataset
)

DEMO_SCALE = 0.08  # train + official val: 421 images; ~340 CPU-seconds to train the four models at 48 px
DEMO_TEST_SCALE = 0.4  # test: 250 images, enough for a decision with intervals to mean something


def generate_demo_dataset(data_dir: Path) -> None:
    """The demo's generated dataset (Kaggle layout and quirks), unless it is already there."""
    from pneumo.data.synthetic import generate_dataset

    if not (data_dir / "chest_xray").is_dir():
        print(f"generating the demo dataset in {data_dir} ...", flush=True)
        generate_dataset(data_dir, seed=0, scale=DEMO_SCALE, test_scale=DEMO_TEST_SCALE, image_kind="small")


def demo_params(data_dir: Path):  # noqa: ANN201 - RetrainParams, imported after the environment is set
    """All four models at 48 px for 8 epochs (VGG16 from random weights without the ImageNet file); the README gate."""
    from pneumo.config import Gate, TrainConfig
    from pneumo.params import RetrainParams

    # The gate checks the lower bound of test recall's 95 % interval (~0.07 below the estimate on
    # the demo's 250 test images), so the threshold aims above the floor: 98 % validation recall.
    # Every epoch runs (patience = epochs) and each model keeps its epoch with the lowest
    # validation loss: the seed's dense model swings between good and poor epochs on this data.
    train = TrainConfig(epochs=8, image_size=48, batch_size=32, recall_target=0.98, early_stopping=True,
                        patience=8, vgg16_weights="auto")
    # force: the second `make demo` trains again and competes with the first's champion.
    return RetrainParams(source=str(data_dir), train=train, gate=Gate(min_recall=0.85, min_specificity=0.5),
                         force=True)


def main() -> int:
    """Run the demo; returns the process exit code."""
    for key, value in DEMO_DEFAULTS.items():
        os.environ.setdefault(key, value)  # before Prefect/TensorFlow read their settings
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notes while models are logged
    from pneumo.config import Settings
    from pneumo.errors import PneumoError

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect warns when it must create it
    print("starting a local Prefect server and TensorFlow ...", flush=True)
    server = _start_prefect_server()
    data_dir = HOME / "demo-data"
    generate_demo_dataset(data_dir)
    importlib.import_module("pneumo.training.train")  # TensorFlow: ~10 s, also while the server boots
    if server is not None:
        server.result()  # it must answer before the flow talks to it
    from flows.retrain import retrain

    params = demo_params(data_dir)
    try:
        result = retrain(params=params)
    except PneumoError as error:
        print(f"pneumo demo: error: {error}", file=sys.stderr)
        return 2
    wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    print_summary(result, params, params.resolved(Settings()).experiment)
    print(f"\nDemo took {wall:.0f} s; CPU time {cpu:.0f} s = {cpu / wall:.2f} of {os.cpu_count()} cores busy on average.")
    return 0


def _start_prefect_server() -> Future | None:
    """Boot Prefect's temporary API server (~20 s of a core) while the dataset is generated and TensorFlow imports.

    None when ``PREFECT_API_URL`` names a server; a start-up failure is raised by ``result()``.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    starter = ThreadPoolExecutor(1, thread_name_prefix="prefect-server")
    future = starter.submit(SubprocessASGIServer().start)
    starter.shutdown(wait=False)
    return future


def _cpu_seconds() -> float:
    return sum(os.times()[:4])  # user + system, own and children's


def print_summary(result: dict, params, experiment: str) -> None:  # noqa: ANN001 - RetrainParams
    """Leaderboard, decision with the numbers compared, and where to look next."""
    from pneumo.promotion.leaderboard import format_leaderboard, leaderboard

    gate = params.gate
    print("\nLeaderboard (val score selects, test score is what the gate compares; test metrics at the tuned "
          "threshold with 95 % intervals by patient)")
    print(format_leaderboard(leaderboard(result["candidates"])))
    decision = result.get("decision") or {}
    print(f"\nGate: test recall ≥ {gate.min_recall} and specificity ≥ {gate.min_specificity} on the interval's "
          f"{gate.floors_on.replace('-', ' ')}; against a champion, the paired score difference's interval must "
          f"clear {gate.margin} ({gate.mode}).")
    if not decision:
        print("Promotion: none: no candidate succeeded")
    else:
        print(f"Selection: {decision['why_selected']}")
        print(f"Promotion: {decision['outcome']}: {decision['candidate']} → {decision['model_name']} version "
              f"{decision['version']}: {decision['reason']}")
        if decision.get("champion_version"):
            print(f"  compared on {decision['n_test_images']} test images ({decision['n_test_patients']} patients): "
                  f"candidate score {decision['score']:.4f} vs champion version {decision['champion_version']} "
                  f"{decision['champion_score']:.4f}; difference {decision['score_diff']:.4f} "
                  f"[{decision['score_diff_ci_low']:.4f}, {decision['score_diff_ci_high']:.4f}], "
                  f"challenger better in {decision['p_better']:.0%} of resamples")
    print(f"\nMLflow UI:  .venv/bin/mlflow ui --backend-store-uri {os.environ['PNEUMO_TRACKING_URI']}"
          f"   (experiment '{experiment}', model registry 'pneumonia-classifier')")
    print(f"Prefect UI: PREFECT_HOME={os.environ['PREFECT_HOME']} .venv/bin/prefect server start"
          "   (flow 'retrain', artifacts 'leaderboard' and 'promotion-decision')")
    print(".venv/bin/pneumo champion --card   (the champion's model card)")


if __name__ == "__main__":
    sys.exit(main())
