"""After a small retraining: what MLflow records (API) and what a person sees in the MLflow and Prefect UIs (Chromium).

One two-candidate retraining (module fixture) against a real ``mlflow server`` and a ``prefect
server`` with its UI on; the page tests drive Debian's headless Chromium and save screenshots to
``tests/.screenshots/`` (listed at the end of the pytest run).
"""

from __future__ import annotations

import json

import re
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from pneumo.data.synthetic import generate_dataset
from pneumo.params import RetrainParams
from pneumo.promotion.tracking import SCORE_METRIC, TAG_KERAS_MODEL, TAG_SERVING_MODEL

# The retraining is ~1.5 min on two busy cores; a hung training thread should fail well before the suite's 900 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CANDIDATES = ["dense", "cnn"]
TRAIN = {"epochs": 1, "image_size": 40, "batch_size": 16, "vgg16_weights": "none"}
DURATION_TOLERANCE = 0.10  # a candidate run's duration vs its task's training time


@dataclass
class Retraining:
    """A finished retraining: the flow's result and where to look at it."""

    result: dict[str, Any]
    mlflow: str  # MLflow server (and UI) address
    prefect_ui: str  # Prefect UI address
    experiment_id: str
    flow_run_id: str  # other tests run retrainings on the same Prefect server: artifacts are looked up by it

    @property
    def decision(self) -> dict[str, Any]:
        return self.result["decision"]

    def candidate(self, name: str) -> dict[str, Any]:
        return next(c for c in self.result["candidates"] if c["name"] == name)


@pytest.fixture(scope="module")
def retraining(prefect_ui_process: Any, mlflow_server: Any, prefect_ui_server: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Retraining:
    """Run the ``retrain`` flow once (dense and cnn, one epoch at 40 px) against both servers (started together)."""
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import retrain

    source = tmp_path_factory.mktemp("ui-source")
    generate_dataset(source, seed=5, scale=0.015, image_kind="small")
    suffix = uuid.uuid4().hex[:10]
    params = RetrainParams(source=str(source), candidates=CANDIDATES, train=TRAIN, gate={"min_recall": 0.0},
                           min_images_per_class=1, registered_model=f"ui-model-{suffix}",
                           experiment=f"ui-exp-{suffix}", tracking_uri=mlflow_server.uri)
    with pytest.MonkeyPatch.context() as patch, temporary_settings(updates={PREFECT_API_URL: prefect_ui_server.api_url}):
        for key, value in prefect_ui_server.env.items():
            patch.setenv(key, value)
        patch.setenv("PNEUMO_HOME", str(tmp_path_factory.mktemp("ui-home")))
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        state = retrain(params=params, return_state=True)
        result = state.result()
    assert [c["status"] for c in result["candidates"]] == ["ok"] * len(CANDIDATES)
    assert result["decision"]["version"], result["decision"]
    experiment = MlflowClient(mlflow_server.uri).get_experiment_by_name(params.experiment)
    return Retraining(result, mlflow_server.uri, prefect_ui_server.api_url.removesuffix("/api"), experiment.experiment_id,
                      str(state.state_details.flow_run_id))


def _js_number(value: float) -> str:
    """A float as JavaScript's ``String(value)`` writes it (what the UIs print): 1 not 1.0."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ----------------------------------------------------------------------------- MLflow, by API
def test_mlflow_keeps_models_in_the_experiment_and_real_run_durations(retraining: Retraining) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(retraining.mlflow)
    run_ids = {c["run_id"]: c["name"] for c in retraining.result["candidates"]}
    models = client.search_logged_models(experiment_ids=[retraining.experiment_id])
    by_run: dict[str, dict[str, Any]] = {}
    for model in models:
        by_run.setdefault(model.source_run_id, {})[model.name] = model

    for run_id, name in run_ids.items():
        run = client.get_run(run_id)
        logged = by_run.get(run_id, {})
        # Every candidate's served pyfunc and Keras network, finished, in the retraining's experiment.
        assert set(logged) == {f"{name}-serving", f"{name}-keras"}, (name, sorted(logged))  # named by candidate
        assert {m.model_id for m in logged.values()} == {
            run.data.tags[TAG_SERVING_MODEL].removeprefix("models:/"),
            run.data.tags[TAG_KERAS_MODEL].removeprefix("models:/")}
        assert all(str(m.status).endswith("READY") for m in logged.values()), [(m.name, m.status) for m in logged.values()]
        assert run.data.metrics[SCORE_METRIC] == round(retraining.candidate(name)["score"], 4)  # as a person reads it

        # The run covers the whole task (opened before training, closed after logging), not just logging.
        run_seconds = (run.info.end_time - run.info.start_time) / 1000
        task_seconds = retraining.result["task_seconds"][f"train-{name}"]
        assert abs(run_seconds - task_seconds) <= DURATION_TOLERANCE * task_seconds, (name, run_seconds, task_seconds)
        assert run_seconds >= retraining.candidate(name)["seconds"] - 1, (name, run_seconds)  # train + evaluate

    # Nothing of this retraining landed in the Default experiment (MLflow's fallback).
    strays = [m.model_id for m in client.search_logged_models(experiment_ids=["0"]) if m.source_run_id in run_ids]
    assert not strays

    versions = client.search_model_versions(f"name='{retraining.decision['model_name']}'")
    assert [v.version for v in versions] == [str(retraining.decision["version"])]
    for version in versions:
        assert version.source.startswith("models:/"), version.source
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert model.experiment_id == retraining.experiment_id
        assert model.source_run_id == version.run_id == retraining.decision["run_id"]
        assert model.name == f"{retraining.decision['candidate']}-serving"
        # Linked as mlflow.register_model links it: the Models tab's "Registered models" column reads this.
        assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": version.name, "version": int(version.version)}]


# ----------------------------------------------------------------------------- MLflow, in the browser
def _close_assistant(browser: Any) -> None:
    """Close MLflow 3's assistant side panel when it is open (it hides a third of the window)."""
    close = browser.page.get_by_role("button", name="Close", exact=True)
    if close.count() and close.first.is_visible():
        close.first.click()


def test_mlflow_pages_show_logged_models_scores_and_the_decision(retraining: Retraining, browser: Any) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(retraining.mlflow)
    ui, experiment = retraining.mlflow, retraining.experiment_id
    decision = retraining.decision

    # (a) Each candidate run's page lists its logged models, ready, in a "Logged models" section.
    for candidate in retraining.result["candidates"]:
        models = client.search_logged_models(experiment_ids=[experiment],
                                             filter_string=f"source_run_id = '{candidate['run_id']}'")
        heading = f"Logged models ({len(models)})"
        browser.open(f"{ui}/#/experiments/{experiment}/runs/{candidate['run_id']}", candidate["name"], heading)
        _close_assistant(browser)
        section = browser.page.locator(f"xpath=//h4[normalize-space(.)='{heading}']/../..")
        for model in models:
            link = section.locator(f"a[href$='/models/{model.model_id}']").filter(
                has_text=re.compile(rf"^\s*{re.escape(model.name)}\s*$"))
            link.first.wait_for(state="visible")
        browser.expect("Ready", within=section)
        browser.screenshot(f"mlflow-run-{candidate['name']}-logged-models", show=section)

    # (b) The experiment's runs table, candidates sorted by the selection score, with the score column
    # added through the table's own "Columns" control (MLflow 3 shows no metric column by default).
    query = urllib.parse.urlencode({"searchFilter": "tags.`pneumo.kind` = 'candidate'",
                                    "orderByKey": f"metrics.`{SCORE_METRIC}`", "orderByAsc": "false"})
    page = browser.open(f"{ui}/#/experiments/{experiment}/runs?{query}", "matching runs")
    _close_assistant(browser)
    # The column picker lists the metrics of the runs loaded so far: wait for every candidate's row.
    for candidate in retraining.result["candidates"]:
        page.locator(f"[row-id='{candidate['run_id']}']").first.wait_for(state="visible")
    page.get_by_role("button", name="Columns", exact=True).click()
    page.get_by_placeholder("Search columns").fill(SCORE_METRIC)
    column = page.locator("[data-testid=column-selector-tree] .du-bois-light-tree-treenode").filter(
        has_text=re.compile(rf"^\s*{re.escape(SCORE_METRIC)}\s*$"))
    column.locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")
    browser.expect(SCORE_METRIC, within=page.get_by_role("columnheader"))
    for candidate in retraining.result["candidates"]:
        score = client.get_run(candidate["run_id"]).data.metrics[SCORE_METRIC]
        row = page.locator(f"[row-id='{candidate['run_id']}']")  # the grid splits a row into pinned + scrolled parts
        row.first.wait_for(state="visible")
        shown = " | ".join(row.all_inner_texts())
        assert candidate["name"] in shown and _js_number(score) in shown, (candidate["name"], score, shown)
        if candidate["name"] == retraining.decision["candidate"]:  # the registered one is marked in the table
            assert f"{candidate['name']} (registered v{retraining.decision['version']})" in shown, shown
    browser.screenshot("mlflow-runs-table-selection-score")

    # (c) The registered version names its source run and model; its description (the model card) the decision.
    version_page = f"{ui}/#/models/{decision['model_name']}/versions/{decision['version']}"
    page = browser.open(version_page, f"Version {decision['version']}", "Source Run", "Model card")
    _close_assistant(browser)
    source = client.get_model_version(decision["model_name"], str(decision["version"])).source
    page.locator(f"a[href$='/runs/{decision['run_id']}']").filter(has_text=decision["candidate"]).first.wait_for()
    page.locator(f"a[href$='/models/{source.removeprefix('models:/')}']").first.wait_for()
    browser.expect("Promotion decision", decision["reason"])
    browser.screenshot("mlflow-version-source-run-and-decision",
                       show=page.get_by_role("heading", name="Promotion decision"))


# ----------------------------------------------------------------------------- links between the tools (#27)
MAX_HEADLINE_METRICS = 20  # what a candidate run shows a person; everything else is in metrics.json


def _run_name(retraining: Retraining, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(retraining.mlflow).get_run(run_id).info.run_name


def _artifact_page(retraining: Retraining, key: str) -> str:
    import httpx

    found = httpx.post(f"{retraining.prefect_ui}/api/artifacts/filter",
                       json={"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [retraining.flow_run_id]}}},
                       timeout=30).raise_for_status().json()
    assert len(found) == 1, found
    return f"{retraining.prefect_ui}/artifacts/artifact/{found[0]['id']}"


def test_a_candidate_run_shows_its_headline_metrics_and_the_registered_one_is_marked(retraining: Retraining,
                                                                                     browser: Any) -> None:
    decision, ui, experiment = retraining.decision, retraining.mlflow, retraining.experiment_id
    for candidate in retraining.result["candidates"]:
        name = _run_name(retraining, candidate["run_id"])
        registered = candidate["name"] == decision["candidate"]
        assert name == (f"{candidate['name']} (registered v{decision['version']})" if registered else candidate["name"])
        page = browser.open(f"{ui}/#/experiments/{experiment}/runs/{candidate['run_id']}", name,
                            re.compile(r"^Metrics \(\d+\)$"))
        _close_assistant(browser)
        heading = page.get_by_text(re.compile(r"^Metrics \(\d+\)$")).first.inner_text()
        assert int(re.search(r"\d+", heading).group()) <= MAX_HEADLINE_METRICS, heading
        for metric in (SCORE_METRIC, "test.selection_score", "test.recall.ci_low"):  # what selects, what the gate judges
            browser.expect(metric)
        if registered:
            browser.screenshot("mlflow-registered-candidate-run-headline-metrics")

    # The experiment's Models tab: the registered version's logged model is shown as registered, the others not.
    page = browser.open(f"{ui}/#/experiments/{experiment}/models", "Registered models",
                        f"{decision['candidate']}-serving")
    _close_assistant(browser)
    from mlflow import MlflowClient

    for model in MlflowClient(ui).search_logged_models(experiment_ids=[experiment]):
        row = page.locator(f"[row-id='{model.model_id}']")
        row.first.wait_for(state="visible")
        shown = " | ".join(row.all_inner_texts())
        is_registered = model.name == f"{decision['candidate']}-serving"
        assert (decision["model_name"] in shown and f"v{decision['version']}" in shown) == is_registered, (model.name, shown)
    browser.screenshot("mlflow-models-tab-registered")


def test_the_retraining_run_links_to_its_prefect_flow_run(retraining: Retraining, browser: Any) -> None:
    from mlflow import MlflowClient

    parent = MlflowClient(retraining.mlflow).get_run(retraining.decision["parent_run_id"])
    flow_run_name = parent.data.tags["pneumo.prefect.flow_run_name"]
    assert parent.info.run_name.startswith(f"{flow_run_name}-")  # the same name in both tools
    page = browser.open(f"{retraining.mlflow}/#/experiments/{retraining.experiment_id}/runs/{parent.info.run_id}",
                        parent.info.run_name, "Retraining run by Prefect flow run")
    _close_assistant(browser)
    url = browser.follow(page.get_by_role("link", name=flow_run_name, exact=True), flow_run_name, "Completed",
                         shot="prefect-flow-run-from-mlflow")
    assert url.endswith(f"/runs/flow-run/{retraining.flow_run_id}"), url


def test_every_link_in_the_model_card_opens_its_mlflow_run(retraining: Retraining, browser: Any) -> None:
    decision = retraining.decision
    page = browser.open(f"{retraining.mlflow}/#/models/{decision['model_name']}/versions/{decision['version']}",
                        "Model card", "Why this candidate")
    _close_assistant(browser)
    card = page.locator("xpath=//h1[starts-with(normalize-space(.), 'Model card')]/..")
    links = card.locator(f"a[href^='{retraining.mlflow}/']")
    assert links.count() == 2, [links.nth(i).get_attribute("href") for i in range(links.count())]
    for run_id in (decision["run_id"], decision["parent_run_id"]):
        url = browser.follow(card.get_by_role("link", name=run_id), _run_name(retraining, run_id), run_id)
        assert run_id in url, url


def test_prefect_artifacts_say_why_show_both_scores_in_view_and_their_links_open_mlflow(
        retraining: Retraining, browser: Any) -> None:
    decision = retraining.decision
    assert decision["why_selected"].startswith(f"{decision['candidate']} selected: ")

    # The leaderboard at the default window: the why line, the score that selects beside the one the gate
    # compared, and each row's status and MLflow run link inside the table's visible pane.
    page = browser.open(_artifact_page(retraining, "leaderboard"), "leaderboard", decision["why_selected"],
                        "val score (selects)", "test score (gate)")
    table = page.locator("table").first
    pane = table.locator("xpath=..").bounding_box()
    for candidate in retraining.result["candidates"]:
        row = page.locator("tbody tr").filter(has=page.get_by_text(candidate["name"], exact=True)).first
        row.wait_for(state="visible")
        shown = row.inner_text()
        status = f"selected ({decision['outcome']})" if candidate["name"] == decision["candidate"] else "ok"
        assert status in shown and f"{candidate['score']:.3f}" in shown, (candidate["name"], shown)
        assert f"{candidate['test']['selection_score']:.3f}" in shown, (candidate["name"], shown)
        link = row.get_by_role("link", name=candidate["run_id"][:8])
        box = link.bounding_box()
        assert box and pane and box["x"] + box["width"] <= pane["x"] + pane["width"], (box, pane)
    browser.screenshot("prefect-leaderboard")
    for candidate in retraining.result["candidates"]:
        row = page.locator("tbody tr").filter(has=page.get_by_text(candidate["name"], exact=True)).first
        url = browser.follow(row.get_by_role("link", name=candidate["run_id"][:8]),
                             _run_name(retraining, candidate["run_id"]), candidate["run_id"])
        assert candidate["run_id"] in url, url

    # The decision: outcome, reason and why; each link opens the MLflow page it names.
    page = browser.open(_artifact_page(retraining, "promotion-decision"), "Promotion decision", decision["reason"],
                        f"why this candidate: {decision['why_selected']}", f"candidate: {decision['candidate']}")
    browser.screenshot("prefect-promotion-decision")
    body = page.locator("article, .artifact-content, main").filter(has_text="Promotion decision").first
    links = body.locator(f"a[href^='{retraining.mlflow}/']")
    assert links.count() == 3, [links.nth(i).get_attribute("href") for i in range(links.count())]
    version = f"{decision['model_name']} version {decision['version']}"
    url = browser.follow(body.get_by_role("link", name=version), f"Version {decision['version']}", "Model card",
                         shot="mlflow-version-from-prefect")
    assert url.endswith(f"/models/{decision['model_name']}/versions/{decision['version']}"), url
    for run_id in (decision["run_id"], decision["parent_run_id"]):
        url = browser.follow(body.get_by_role("link", name=run_id[:8], exact=True), _run_name(retraining, run_id),
                             run_id)
        assert run_id in url, url
