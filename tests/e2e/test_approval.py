"""``gate.approval: required`` on a real Prefect server and MLflow: the retraining pauses with Prefect's input
form, and what a person answers (approve, reject, nothing) decides whether ``champion`` moves.

One unattended retraining makes the champion (module fixture); each test then retrains once (one tiny
candidate, one epoch, forced past the skip) with approval required and a gate the candidate passes.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from pneumo.data.synthetic import generate_dataset
from pneumo.params import RetrainParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TRAIN = {"epochs": 1, "image_size": 32, "batch_size": 16, "vgg16_weights": "none"}
# Passes the floors and the paired test against any champion: only the person's answer decides.
PASSING = {"min_recall": 0.0, "mode": "non-inferiority", "margin": 1.0}
DESCRIPTION_KEY, RESPONSE_KEY = "paused-approval-description", "paused-approval-response"


@dataclass
class Setup:
    params: RetrainParams  # approval required, forced past the skip
    mlflow: str
    home: Path

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.mlflow)

    def champion(self) -> str:
        return str(self.client().get_model_version_by_alias(self.params.registered_model, "champion").version)

    def version(self, number: Any) -> Any:
        return self.client().get_model_version(self.params.registered_model, str(number))


@contextmanager
def _on(server: Any, setup_home: Path, mlflow_uri: str) -> Iterator[None]:
    """In-process flow runs against ``server`` (its settings in this context, its env for subprocesses)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with pytest.MonkeyPatch.context() as patch, temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        for key, value in server.env.items():
            patch.setenv(key, value)
        patch.setenv("PNEUMO_HOME", str(setup_home))
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        yield


@pytest.fixture(scope="module")
def setup(prefect_server: Any, mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Setup:
    """A champion (version 1) from one unattended retraining (``approval: none``, the default)."""
    from flows.retrain import retrain

    if any("prefect_ui_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("prefect_ui_process")  # the UI test's server boots while this retraining runs

    source = tmp_path_factory.mktemp("approval-source")
    generate_dataset(source, seed=11, scale=0.015, image_kind="small")
    suffix = uuid.uuid4().hex[:10]
    params = RetrainParams(source=str(source), candidates=["dense"], train=TRAIN, gate={"min_recall": 0.0},
                           min_images_per_class=1, registered_model=f"approval-model-{suffix}",
                           experiment=f"approval-exp-{suffix}", tracking_uri=mlflow_server.uri)
    home = tmp_path_factory.mktemp("approval-home")
    with _on(prefect_server, home, mlflow_server.uri):
        first = retrain(params=params)
    assert first["decision"]["outcome"] == "promoted" and first["decision"]["approval"] is None
    required = params.model_copy(update={"force": True, "gate": params.gate.model_copy(
        update={**PASSING, "approval": "required"})})
    made = Setup(required, mlflow_server.uri, home)
    assert made.champion() == "1" and made.version(1).tags["pneumo.approval"] == "not required"
    return made


def _api(server: Any, method: str, path: str, body: Any = None) -> Any:
    response = requests.request(method, f"{server.api_url}{path}", json=body, timeout=30)
    assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:500]}"
    return response.json() if response.content else None


def _start(setup: Setup, server: Any, params: RetrainParams) -> tuple[Future[Any], str]:
    """Run the retraining in a thread (it blocks while paused); returns its future and flow-run name."""
    from flows.retrain import retrain

    name = f"approval-{uuid.uuid4().hex[:8]}"
    done: Future[Any] = Future()

    def run() -> None:
        try:
            with _on(server, setup.home, setup.mlflow):
                state = retrain.with_options(flow_run_name=name)(params=params, return_state=True)
                # Read here: in the test's thread a running Playwright loop makes Prefect's result() async.
                done.set_result((state, state.result()))
        except BaseException as error:  # noqa: BLE001 - re-raised by the test through the future
            done.set_exception(error)

    # A copy of this context: the thread sees no Prefect settings of another test.
    threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True).start()
    return done, name


def _run(server: Any, name: str) -> dict[str, Any] | None:
    found = _api(server, "POST", "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    return found[0] if found else None


def _wait_paused(server: Any, name: str, done: Future[Any], timeout: float = 300) -> dict[str, Any]:
    """The flow run once it is PAUSED (fails with the flow's error if it ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done.done():
            pytest.fail(f"the flow ended without pausing: {done.result()[0]}")
        run = _run(server, name)
        if run and run["state_type"] == "PAUSED":
            return run
        time.sleep(0.25)
    pytest.fail(f"flow run {name} did not pause within {timeout:.0f} s: {_run(server, name)}")


def _description(server: Any, run: dict[str, Any]) -> str:
    value = _api(server, "GET", f"/flow_runs/{run['id']}/input/{DESCRIPTION_KEY}")
    return value if isinstance(value, str) else json.dumps(value)


def _outcome(done: Future[Any]) -> tuple[Any, dict[str, Any]]:
    state, result = done.result(timeout=300)
    return state, result["decision"]


def _resume(run: dict[str, Any], answer: dict[str, Any]) -> None:
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(run["id"], run_input=answer)


def _on_server(server: Any, call: Callable[[], Any]) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        return call()


def test_required_approval_pauses_and_approve_promotes_recording_the_approver(setup: Setup, prefect_server) -> None:
    before = setup.champion()
    done, name = _start(setup, prefect_server, setup.params)
    run = _wait_paused(prefect_server, name, done)
    # The form's text: the gate's numbers and links; nothing is registered while it waits.
    shown = _description(prefect_server, run)
    assert f"Approve dense as champion of {setup.params.registered_model}?" in shown
    assert f"champion version {before} on the same images: test score" in shown and "score difference: " in shown and "test recall:" in shown
    assert f"candidate run in MLflow: {setup.mlflow}/#/runs/" in shown
    assert shown.rstrip().endswith(f"/versions/{before}")  # the champion's version page
    assert setup.champion() == before
    assert len(setup.client().search_model_versions(f"name = '{setup.params.registered_model}'")) == int(before)

    _on_server(prefect_server, lambda: _resume(run, {"approve": True, "approver": "Dr. Ada Lovelace",
                                                     "reason": "reviewed the paired test and the heatmaps"}))
    state, decision = _outcome(done)
    assert state.is_completed() and decision["outcome"] == "promoted", decision
    assert setup.champion() == decision["version"] != before
    version = setup.version(decision["version"])
    assert version.tags["pneumo.approval"].startswith("approved by Dr. Ada Lovelace at ")
    assert version.tags["pneumo.approval"].endswith(": reviewed the paired test and the heatmaps")
    assert "## Approval\n- **approved** by Dr. Ada Lovelace at " in version.description  # the model card
    approval = decision["approval"]
    assert approval["status"] == "approved" and approval["approver_source"] == "typed"
    assert approval["flow_run_id"] == run["id"]


def test_reject_registers_a_challenger_and_leaves_champion(setup: Setup, prefect_server) -> None:
    before = setup.champion()
    done, name = _start(setup, prefect_server, setup.params)
    run = _wait_paused(prefect_server, name, done)
    _on_server(prefect_server, lambda: _resume(run, {"approve": False, "approver": "Dr. Grace Hopper",
                                                     "reason": "wait for the second site's data"}))
    state, decision = _outcome(done)
    assert state.is_completed() and decision["outcome"] == "challenger", decision
    assert "not signed off: rejected by Dr. Grace Hopper: wait for the second site's data" in decision["reason"]
    assert setup.champion() == before
    client = setup.client()
    assert str(client.get_model_version_by_alias(setup.params.registered_model, "challenger").version) \
        == decision["version"]
    version = setup.version(decision["version"])
    assert version.tags["pneumo.approval"].startswith("rejected by Dr. Grace Hopper at ")
    assert version.tags["pneumo.decision"] == "challenger"
    assert "## Approval" in version.description and "rejected by Dr. Grace Hopper" in version.description


def test_no_answer_within_the_timeout_registers_a_challenger_and_leaves_champion(setup: Setup,
                                                                                prefect_server) -> None:
    before = setup.champion()
    params = setup.params.model_copy(update={"gate": setup.params.gate.model_copy(update={"approval_timeout": 1})})
    done, name = _start(setup, prefect_server, params)
    state, decision = _outcome(done)
    assert state.is_completed() and decision["outcome"] == "challenger", decision
    assert "not signed off: no approval within 1 s" in decision["reason"]
    assert setup.champion() == before
    version = setup.version(decision["version"])
    assert version.tags["pneumo.approval"].startswith("timed out by nobody at ")
    assert _run(prefect_server, name)["state_type"] == "COMPLETED"  # it paused, then finished, not failed
    states = _api(prefect_server, "GET", f"/flow_run_states/?flow_run_id={_run(prefect_server, name)['id']}")
    assert "PAUSED" in [s["type"] for s in states]


def test_a_person_approves_through_the_prefect_ui_form(setup: Setup, prefect_ui_server, browser) -> None:
    before = setup.champion()
    done, name = _start(setup, prefect_ui_server, setup.params)
    run = _wait_paused(prefect_ui_server, name, done)
    ui = prefect_ui_server.api_url.removesuffix("/api")
    page = browser.open(f"{ui}/runs/flow-run/{run['id']}", name, "Paused")
    page.get_by_role("button", name="Resume").first.click()
    # The decision summary above the form, with its numbers, what each answer does, and the MLflow links.
    browser.expect("Approve dense as champion", "test recall:", "No answer within 86400 s counts as a rejection",
                   f"candidate run in MLflow: {setup.mlflow}/#/runs/")
    browser.screenshot("prefect-approval-form")
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("switch").first.click()  # approve
    fields = dialog.locator("textarea")
    fields.nth(0).fill("Dr. Mary Jackson")
    fields.nth(1).fill("approved in the UI")
    browser.screenshot("prefect-approval-form-filled")
    dialog.get_by_role("button", name="Submit").click()
    state, decision = _outcome(done)
    assert state.is_completed() and decision["outcome"] == "promoted", decision
    assert setup.champion() == decision["version"] != before
    assert setup.version(decision["version"]).tags["pneumo.approval"].startswith("approved by Dr. Mary Jackson at ")


def test_a_candidate_that_fails_the_gate_is_never_put_to_a_person(setup: Setup, prefect_server) -> None:
    before = setup.champion()
    failing = setup.params.gate.model_copy(update={"min_specificity": 1.0})  # no 95 % lower bound reaches 1
    done, name = _start(setup, prefect_server, setup.params.model_copy(update={"gate": failing}))
    state, decision = _outcome(done)
    assert state.is_completed() and decision["outcome"] == "challenger", decision
    assert setup.champion() == before
    states = _api(prefect_server, "GET", f"/flow_run_states/?flow_run_id={_run(prefect_server, name)['id']}")
    assert "PAUSED" not in [s["type"] for s in states]  # nobody was asked
    assert setup.version(decision["version"]).tags["pneumo.approval"].startswith("not asked: the statistical gate did not pass")
