"""Static checks of prefect.yaml and the work-pool templates in deployments/ (no Prefect server needed)."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import importlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pydantic import ValidationError

from pneumo.params import RetrainParams, WatchParams

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
GPU_YAML = ROOT / "deployments" / "gpu.prefect.yaml"
COMPOSE = ROOT / "docker" / "compose.yaml"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
DEPLOYMENTS_README = ROOT / "deployments" / "README.md"

# Work pools fixed for the project: name -> (type, base job template).
POOLS = {
    "pneumo-process": ("process", ROOT / "deployments" / "process.json"),
    "pneumo-gpu-docker": ("docker", ROOT / "deployments" / "gpu-docker.json"),
    "pneumo-gpu-k8s": ("kubernetes", ROOT / "deployments" / "gpu-k8s.json"),
}
ENTRYPOINT = "flows/retrain.py:retrain"
WATCH_ENTRYPOINT = "flows/watch.py:watch_dataset"
RETRAININGS = ("retrain-weekly", "retrain-on-demand", "retrain-on-new-data")
WEEKLY_CRON = "0 3 * * 1"
IMAGE_REPO_DIR = "/opt/pneumo"


# ---------------------------------------------------------------- helpers


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML file (anchors resolved).

    Args:
        path: The file.

    Returns:
        The document.
    """
    return yaml.safe_load(path.read_text())


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The deployments of a prefect.yaml document keyed by name.

    Args:
        doc: Parsed prefect.yaml.

    Returns:
        Name -> deployment.
    """
    deployments = doc.get("deployments")
    if not isinstance(deployments, list):
        return {}
    return {d["name"]: d for d in deployments if isinstance(d, dict) and "name" in d}


def prefect_yaml_problems(doc: dict[str, Any]) -> list[str]:
    """What is wrong with prefect.yaml against the project's fixed deployment names and policy.

    Args:
        doc: Parsed prefect.yaml.

    Returns:
        One message per problem.
    """
    problems = []
    if not isinstance(doc.get("deployments"), list):
        problems.append("prefect.yaml: deployments must be a list")
    deployments = by_name(doc)
    for name in RETRAININGS:
        deployment = deployments.get(name)
        if deployment is None:
            problems.append(f"deployment {name} is missing")
            continue
        if deployment.get("entrypoint") != ENTRYPOINT:
            problems.append(f"{name}: entrypoint is {deployment.get('entrypoint')!r}, not {ENTRYPOINT}")
        pool = (deployment.get("work_pool") or {}).get("name")
        if pool != "pneumo-process":
            problems.append(f"{name}: work pool is {pool!r}, not pneumo-process")
        limit = deployment.get("concurrency_limit")
        if (limit.get("limit") if isinstance(limit, dict) else limit) != 1:
            problems.append(f"{name}: concurrency_limit must be 1")
        if (deployment.get("work_pool") or {}).get("work_queue_name") != "retraining":
            problems.append(f"{name}: work queue must be 'retraining' (one retraining at a time across deployments)")
        params = (deployment.get("parameters") or {}).get("params")
        if not isinstance(params, dict):
            problems.append(f"{name}: parameters.params must be a mapping")
        else:
            try:
                RetrainParams.model_validate(params)
            except ValidationError as error:
                problems.append(f"{name}: parameters.params is not a valid RetrainParams: "
                                + "; ".join(".".join(map(str, e["loc"])) for e in error.errors()))
    weekly = deployments.get("retrain-weekly", {})
    schedules = weekly.get("schedules") or []
    if [(s.get("cron"), s.get("timezone"), s.get("active", True)) for s in schedules] != [
        (WEEKLY_CRON, "UTC", True)
    ]:
        problems.append(f"retrain-weekly: schedules must be one active cron {WEEKLY_CRON!r} in UTC, got {schedules}")
    if deployments.get("retrain-on-demand", {}).get("schedules"):
        problems.append("retrain-on-demand must have no schedule")
    triggers = deployments.get("retrain-on-new-data", {}).get("triggers") or []
    if [t.get("expect") for t in triggers] != [["pneumo.dataset.changed"]]:
        problems.append(f"retrain-on-new-data: one trigger expecting pneumo.dataset.changed, got {triggers}")
    watch = deployments.get("watch-dataset", {})
    if watch.get("entrypoint") != WATCH_ENTRYPOINT:
        problems.append(f"watch-dataset: entrypoint must be {WATCH_ENTRYPOINT}")
    try:
        WatchParams.model_validate((watch.get("parameters") or {}).get("params") or {})
    except ValidationError as error:
        problems.append(f"watch-dataset: parameters.params is not a valid WatchParams: {error.errors()[0]['loc']}")
    return problems


def default_values(template: dict[str, Any]) -> dict[str, Any]:
    """The defaults of a base job template's variables.

    Args:
        template: A base job template.

    Returns:
        Variable name -> default, for variables that have one.
    """
    return {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }


def render(template: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill a base job template with its defaults (and overrides), as a worker does.

    Args:
        template: A base job template.
        values: Job variables that override the defaults.

    Returns:
        The job configuration.
    """
    from prefect.utilities.templating import apply_values

    variables = {**default_values(template), **(values or {})}
    return apply_values(copy.deepcopy(template["job_configuration"]), variables)


def template_problems(name: str, pool_type: str, template: dict[str, Any]) -> list[str]:
    """Validate a base job template the way the Prefect API does on `work-pool create`.

    Args:
        name: Pool name.
        pool_type: Pool type.
        template: The base job template.

    Returns:
        One message per problem.
    """
    from prefect.server.schemas.actions import WorkPoolCreate

    problems = []
    try:
        WorkPoolCreate(name=name, type=pool_type, base_job_template=template)
    except Exception as exc:
        problems.append(f"{name}: rejected by the API schema: {exc}")
    for variable, spec in template["variables"]["properties"].items():
        if "default" in spec:
            schema = {k: v for k, v in spec.items() if k != "default"}
            try:
                jsonschema.validate(spec["default"], schema)
            except jsonschema.ValidationError as exc:
                problems.append(f"{name}: default of {variable} does not fit its schema: {exc.message}")
    return problems


def compose_worker_command() -> list[str]:
    """The compose GPU worker's command."""
    return load_yaml(COMPOSE)["services"]["worker"]["command"]


def option(command: list[str], flag: str) -> str:
    """The value after a flag in an argv list."""
    return command[command.index(flag) + 1]


# ---------------------------------------------------------------- prefect.yaml


@pytest.fixture(scope="module")
def prefect_doc() -> dict[str, Any]:
    return load_yaml(PREFECT_YAML)


@pytest.fixture(scope="module")
def gpu_doc() -> dict[str, Any]:
    return load_yaml(GPU_YAML)


def test_prefect_yaml_defines_the_retrainings_and_the_watch(prefect_doc: dict[str, Any]) -> None:
    assert prefect_yaml_problems(prefect_doc) == []
    assert set(by_name(prefect_doc)) == {*RETRAININGS, "watch-dataset"}
    on_new_data = by_name(prefect_doc)["retrain-on-new-data"]
    assert on_new_data["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert by_name(prefect_doc)["watch-dataset"]["schedules"] == [{"interval": 900, "active": True}]
    assert by_name(prefect_doc)["watch-dataset"]["work_pool"]["work_queue_name"] == "watch"


def test_weekly_schedule_fires_on_monday_at_three_utc(prefect_doc: dict[str, Any]) -> None:
    from prefect.server.schemas.schedules import CronSchedule  # the schedule the server will run

    (config,) = by_name(prefect_doc)["retrain-weekly"]["schedules"]
    assert config.get("active", True) is True
    schedule = CronSchedule(cron=config["cron"], timezone=config["timezone"])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    dates = asyncio.run(schedule.get_dates(n=3, start=start))
    assert [d.isoformat() for d in dates] == [
        "2026-01-05T03:00:00+00:00", "2026-01-12T03:00:00+00:00", "2026-01-19T03:00:00+00:00",
    ]


def test_default_params_are_valid_and_match_the_stack(prefect_doc: dict[str, Any]) -> None:
    from pneumo.config import Settings

    params = by_name(prefect_doc)["retrain-weekly"]["parameters"]["params"]
    assert by_name(prefect_doc)["retrain-on-new-data"]["parameters"]["params"] == params
    # A person asked for it: on-demand trains even on unchanged data; the other two skip then.
    assert by_name(prefect_doc)["retrain-on-demand"]["parameters"]["params"] == {**params, "force": True}
    assert "force" not in params and RetrainParams.model_fields["force"].default is False
    assert by_name(prefect_doc)["watch-dataset"]["parameters"]["params"]["source"] == params["source"]
    validated = RetrainParams.model_validate(params)
    assert validated.model_dump(mode="json", exclude_unset=True) == params  # nothing dropped or coerced
    assert validated.gate.min_specificity > 0  # production refuses an "always pneumonia" model
    assert validated.registered_model in (None, Settings.model_fields["registered_model"].default)
    # The default source is the compose stack's dataset bucket.
    bucket = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#"))["PNEUMO_DATA_BUCKET"]
    assert params["source"] == f"s3://{bucket}/chest_xray"


def test_flow_takes_one_typed_parameter() -> None:
    module = importlib.import_module("flows.retrain")
    assert module.retrain.name == "retrain"
    assert list(module.retrain.parameters.properties) == ["params"]


def test_pull_step_moves_into_the_repository(prefect_doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.utilities.templating import apply_values

    (step,) = prefect_doc["pull"]
    ((fqn, inputs),) = step.items()
    module, _, function = fqn.rpartition(".")
    assert callable(getattr(importlib.import_module(module), function))
    # At run time the worker resolves {{ $PNEUMO_REPO_DIR }} from its own environment.
    monkeypatch.setenv("PNEUMO_REPO_DIR", str(ROOT))
    resolved = apply_values(inputs, {})
    assert Path(resolved["directory"]) == ROOT
    assert (Path(resolved["directory"]) / ENTRYPOINT.split(":")[0]).is_file(), "entrypoint file missing"


# ---------------------------------------------------------------- work-pool templates


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_pool_template_is_accepted_by_prefect(pool: str) -> None:
    pool_type, path = POOLS[pool]
    template = json.loads(path.read_text())
    assert template_problems(pool, pool_type, template) == []


def test_process_template_renders_a_process_job() -> None:
    from prefect.workers.process import ProcessJobConfiguration

    rendered = render(json.loads(POOLS["pneumo-process"][1].read_text()))
    config = ProcessJobConfiguration(**rendered)
    assert config.env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert config.working_dir is None


def test_docker_template_requests_nvidia_gpus() -> None:
    import docker.types
    from docker.models.containers import RUN_CREATE_KWARGS, RUN_HOST_CONFIG_KWARGS

    template = json.loads(POOLS["pneumo-gpu-docker"][1].read_text())
    rendered = render(template)
    kwargs = rendered["container_create_kwargs"]
    assert set(kwargs) <= set(RUN_CREATE_KWARGS) | set(RUN_HOST_CONFIG_KWARGS)
    # docker-py builds the same HostConfig the Docker worker sends to the engine.
    host_config = docker.types.HostConfig(version="1.44", device_requests=kwargs["device_requests"])
    (request,) = host_config["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["Capabilities"] == [["gpu"]] and request["Count"] == -1
    # Flow-run containers join the compose network and reach the services by name.
    compose = load_yaml(COMPOSE)
    assert rendered["networks"] == [compose["networks"]["default"]["name"]]
    assert rendered["env"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert rendered["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # Credentials are Secret-block references resolved by the worker, never literals.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert re.fullmatch(r"\{\{ prefect\.blocks\.secret\.[a-z0-9-]+ \}\}", rendered["env"][key]), key
    assert rendered["image"] == "pneumo-worker:0.1.0-gpu"
    assert rendered["env"]["PNEUMO_REPO_DIR"] == IMAGE_REPO_DIR


def test_kubernetes_template_limits_nvidia_gpus() -> None:
    template = json.loads(POOLS["pneumo-gpu-k8s"][1].read_text())
    for gpus in (1, 2):
        manifest = render(template, {"gpu_count": gpus})["job_manifest"]
        (container,) = manifest["spec"]["template"]["spec"]["containers"]
        assert container["name"] == "prefect-job"  # the name the Kubernetes worker looks for
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["envFrom"] == [{"secretRef": {"name": "pneumo-env"}}]
        assert container["image"] == "pneumo-worker:0.1.0-gpu"
    assert default_values(template)["gpu_count"] == 1


def test_images_in_templates_match_the_compose_image() -> None:
    env = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    compose_image = load_yaml(COMPOSE)["services"]["worker"]["image"].replace(
        "${PNEUMO_IMAGE_TAG:-0.1.0}", env["PNEUMO_IMAGE_TAG"]
    )
    for pool in ("pneumo-gpu-docker", "pneumo-gpu-k8s"):
        assert default_values(json.loads(POOLS[pool][1].read_text()))["image"] == compose_image


# ---------------------------------------------------------------- names agree everywhere


def test_pool_names_agree_across_files(prefect_doc: dict[str, Any], gpu_doc: dict[str, Any]) -> None:
    for doc in (prefect_doc, gpu_doc):
        for deployment in doc["deployments"]:
            assert deployment["work_pool"]["name"] in POOLS, deployment["name"]
    # The compose worker and the image's default command poll the deployments' pool.
    for command in (compose_worker_command(), _dockerfile_cmd()):
        assert option(command, "--pool") == "pneumo-process"
        assert option(command, "--type") == POOLS["pneumo-process"][0]
        template_path = option(command, "--base-job-template")
        assert template_path == f"{IMAGE_REPO_DIR}/deployments/{POOLS['pneumo-process'][1].name}"
        # Two slots: one retraining (the `retraining` queue's limit holds the others back) and one
        # dataset watch, which must not wait behind a training.
        assert option(command, "--limit") == "2"
    assert "COPY deployments ./deployments" in WORKER_DOCKERFILE.read_text()


def test_gpu_deployments(prefect_doc: dict[str, Any], gpu_doc: dict[str, Any]) -> None:
    defaults = by_name(prefect_doc)["retrain-weekly"]["parameters"]["params"]
    deployments = by_name(gpu_doc)
    assert {"retrain-on-demand-gpu-docker", "retrain-weekly-gpu-docker", "retrain-on-demand-gpu-k8s",
            "retrain-on-demand-dask"} <= set(deployments)
    for name, deployment in deployments.items():
        assert deployment["entrypoint"] == ENTRYPOINT, name
        assert deployment["concurrency_limit"] == 1, name
        assert deployment["parameters"]["params"] == defaults, f"{name}: params drift from prefect.yaml"
        pool = deployment["work_pool"]["name"]
        variables = json.loads(POOLS[pool][1].read_text())["variables"]["properties"]
        assert set(deployment["work_pool"].get("job_variables") or {}) <= set(variables), name
        (step,) = deployment["pull"]
        directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
        expected = "{{ $PNEUMO_REPO_DIR }}" if pool == "pneumo-process" else IMAGE_REPO_DIR
        assert directory == expected, name
    weekly = deployments["retrain-weekly-gpu-docker"]["schedules"]
    assert [(s["cron"], s["timezone"], s["active"]) for s in weekly] == [(WEEKLY_CRON, "UTC", False)]
    dask_env = deployments["retrain-on-demand-dask"]["work_pool"]["job_variables"]["env"]
    scheduler = load_yaml(COMPOSE)["services"]["dask-scheduler"]["command"]
    assert dask_env["PNEUMO_DASK_ADDRESS"] == f"tcp://dask-scheduler:{option(scheduler, '--port')}"


def _dockerfile_cmd() -> list[str]:
    text = WORKER_DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^CMD (\[.*?\])\s*$", text, re.MULTILINE | re.DOTALL)
    assert match, "worker.Dockerfile has no exec-form CMD"
    return json.loads(match.group(1))


# ---------------------------------------------------------------- the checks fail on broken copies


def test_broken_prefect_yaml_is_caught(prefect_doc: dict[str, Any]) -> None:
    broken = copy.deepcopy(prefect_doc)
    weekly, on_demand, on_new_data, watch = broken["deployments"]
    on_new_data["triggers"][0]["expect"] = ["pneumo.dataset.changd"]
    on_new_data["work_pool"] = {"name": "pneumo-process", "work_queue_name": "default"}
    watch["parameters"]["params"]["settle_seconds"] = -1
    weekly["schedules"][0]["cron"] = "0 3 * * 0"
    weekly["work_pool"] = {"name": "pneumo-proces"}
    on_demand["concurrency_limit"] = 2
    on_demand["schedules"] = [{"interval": 3600}]
    on_demand["parameters"]["params"]["epoch"] = 3
    problems = prefect_yaml_problems(broken)
    assert any("retrain-weekly: schedules" in p for p in problems)
    assert "retrain-weekly: work pool is 'pneumo-proces', not pneumo-process" in problems
    assert "retrain-on-demand: concurrency_limit must be 1" in problems
    assert "retrain-on-demand must have no schedule" in problems
    assert "retrain-on-demand: parameters.params is not a valid RetrainParams: epoch" in problems
    assert any(p.startswith("retrain-on-new-data: one trigger expecting pneumo.dataset.changed") for p in problems)
    assert any(p.startswith("retrain-on-new-data: work queue must be 'retraining'") for p in problems)
    assert "watch-dataset: parameters.params is not a valid WatchParams: ('settle_seconds',)" in problems
    del broken["deployments"][1]
    assert "deployment retrain-on-demand is missing" in prefect_yaml_problems(broken)
    broken["deployments"] = "not a list"
    assert "prefect.yaml: deployments must be a list" in prefect_yaml_problems(broken)


def test_broken_template_is_caught() -> None:
    template = json.loads(POOLS["pneumo-gpu-docker"][1].read_text())
    template["job_configuration"]["container_create_kwargs"] = "{{ container_kwargs }}"
    template["variables"]["properties"]["auto_remove"]["default"] = "yes"
    problems = template_problems("pneumo-gpu-docker", "docker", template)
    assert any("undeclared variable(s): container_kwargs" in p for p in problems)
    assert any("default of auto_remove" in p for p in problems)
