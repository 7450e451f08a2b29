"""Bad numbers never pass: NaN and infinity are refused wherever a float enters (CLI flags, flow parameters)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pneumo.cli import main
from pneumo.config import Gate, TrainConfig
from pneumo.params import RetrainParams


@pytest.mark.parametrize("flag", ["--margin", "--score-weight", "--min-recall", "--min-specificity"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_promote_refuses_non_finite_flags_before_any_work(flag: str, value: str, capsys) -> None:
    # No tracking server is reachable at this URI: the flag must be refused before it is tried.
    assert main(["promote", f"{flag}={value}", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    error = capsys.readouterr().err
    assert "invalid parameter" in error and flag.removeprefix("--").replace("-", "_") in error


@pytest.mark.parametrize("model", [TrainConfig, Gate])
def test_every_float_field_refuses_nan_and_infinity(model) -> None:
    floats = [name for name, field in model.model_fields.items() if float in (field.annotation,
              *getattr(field.annotation, "__args__", ()))]
    assert floats
    for name in floats:
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValidationError, match=name):
                model(**{name: value})


def test_train_flags_refuse_nan(capsys) -> None:
    assert main(["train", "cnn", "--data", "/nonexistent", "--learning-rate", "nan"]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_flow_parameters_refuse_nan_in_nested_fields() -> None:
    with pytest.raises(ValidationError, match="gate.margin"):
        RetrainParams.model_validate({"gate": {"margin": "NaN"}})
    with pytest.raises(ValidationError, match="train.val_fraction"):
        RetrainParams.model_validate({"train": {"val_fraction": float("nan")}})


@pytest.mark.parametrize("command", ["synth", "ingest", "manifest", "train", "promote", "rollback", "champion"])
def test_every_subcommand_prints_its_help(command: str, capsys) -> None:
    # Flags are generated from the config models; a "%" in a description once crashed `promote --help`.
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"usage: pneumo {command}" in capsys.readouterr().out


def test_a_seed_numpy_cannot_take_is_refused() -> None:
    # #25: train.seed=4294967296 passed validation, then every candidate failed.
    with pytest.raises(ValidationError, match="train.seed"):
        RetrainParams(train={"seed": 2**32})
    assert RetrainParams(train={"seed": 2**32 - 1}).train.seed == 2**32 - 1


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_a_bad_parallel_candidates_setting_is_refused_by_name(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo.config import Settings

    monkeypatch.setenv("PNEUMO_PARALLEL_CANDIDATES", value)
    with pytest.raises(ValidationError, match="parallel_candidates"):
        Settings()


def test_a_home_setting_with_a_tilde_is_the_users_home(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from pneumo.config import Settings

    monkeypatch.setenv("PNEUMO_HOME", "~/pneumo-work")  # as a quoted shell value arrives: unexpanded
    assert Settings().home == Path.home() / "pneumo-work"


def test_only_transient_failures_are_retried() -> None:
    # #25: every error that was not a PneumoError was retried, a bug costing ~95 s of retries.
    from prefect.states import Failed

    from flows.retrain import _retry_transient
    from pneumo.errors import CandidateLoggingError, StorageError, TransientStorageError

    def retried(error: BaseException) -> bool:
        return _retry_transient(None, None, Failed(data=error))

    assert retried(TransientStorageError("503")) and retried(CandidateLoggingError("down"))
    assert retried(ConnectionResetError("reset by peer")) and retried(TimeoutError("read timed out"))
    assert not retried(StorageError("no such bucket")) and not retried(KeyError("a bug"))
    assert not retried(TypeError("a bug"))


def test_common_cli_mistakes_print_one_line_and_no_traceback(tmp_path, capsys) -> None:
    # #25: an unknown run id (an MlflowException) and --csv naming a folder (an OSError) printed tracebacks.
    from pneumo.data.synthetic import generate_dataset

    store = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["promote", "0123456789abcdef0123456789abcdef", "--tracking-uri", store, "--dry-run"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == "pneumo: error: MlflowException: Run with id=0123456789abcdef0123456789abcdef not found"

    generate_dataset(tmp_path / "data", seed=1, scale=0.01, image_kind="small")
    (tmp_path / "a-folder").mkdir()
    assert main(["ingest", str(tmp_path / "data"), "--cache", str(tmp_path / "cache"),
                 "--csv", str(tmp_path / "a-folder")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("pneumo: error: [Errno 21] Is a directory")
