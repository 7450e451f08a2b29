"""Static checks of the compose stack, the Dockerfiles and .env.example (no Docker engine needed)."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
INIT_ENV = DOCKER / "init-env.sh"

# Variable names the code reads (team contract); the worker containers must set each one.
CODE_ENV = {
    "MLFLOW_TRACKING_URI",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
    "PREFECT_API_URL",
    "PNEUMO_HOME",
    "PNEUMO_S3_ENDPOINT_URL",
}
WORKER_SERVICES = ("worker", "worker-cpu", "dask-gpu-worker-0", "dask-gpu-worker-1")
GPU_SERVICES = ("worker", "dask-gpu-worker-0", "dask-gpu-worker-1")
ONE_SHOT_SERVICES = ("minio-init",)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|PRIVATE", re.IGNORECASE)
# Settings whose names match SECRET_NAME but hold no secret (a host list, a yes/no switch).
NOT_SECRETS = {"MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"}

# Compose interpolation: $$ escapes, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, $NAME.
_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A mandatory ``${NAME:?message}`` variable is unset or empty."""


# ---------------------------------------------------------------- helpers (pure, reused by the
# negative tests below so that each check is shown to fail on a broken input)


def parse_env_file(path: Path) -> dict[str, str]:
    """Read KEY=VALUE lines of a dotenv file (comments and blank lines skipped).

    Args:
        path: The file.

    Returns:
        The assignments in file order.
    """
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"{path.name}: not a KEY=VALUE line: {line!r}"
        values[key.strip()] = value.strip()
    return values


def referenced_variables(text: str) -> set[str]:
    """Names of every variable a compose file interpolates (``$$`` escapes excluded).

    Args:
        text: Raw compose file text.

    Returns:
        The variable names.
    """
    names = set()
    for match in _REFERENCE.finditer(text):
        name = match.group("braced") or match.group("plain")
        if name:
            names.add(name)
    return names


def interpolate(value: str, env: dict[str, str]) -> str:
    """Substitute variables in one string the way Compose does.

    Args:
        value: A string value from the compose file.
        env: The variables (the env file).

    Returns:
        The string with every reference replaced.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op") or "", match.group("arg") or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise InterpolationError(f"{name}: {arg}")
            return current
        if op in (":+", "+"):
            return arg if current else ""
        return current or ""

    return _REFERENCE.sub(replace, value)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    """Interpolate every string in a parsed compose document (Compose interpolates values only).

    Args:
        node: Parsed YAML.
        env: The variables.

    Returns:
        A new tree with substituted strings.
    """
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Parse and interpolate a compose file.

    Args:
        path: The compose file.
        env: The variables.

    Returns:
        The resolved compose document.
    """
    return interpolate_tree(yaml.safe_load(path.read_text()), env)


def filled_env(example: Path) -> dict[str, str]:
    """The example env with every empty secret given a dummy value, as a real .env would have.

    Args:
        example: The .env.example file.

    Returns:
        The variables.
    """
    env = parse_env_file(example)
    return {key: (value or f"dummy-{key.lower()}") for key, value in env.items()}


def port_problems(compose: dict[str, Any]) -> list[str]:
    """Published ports that are not bound to 127.0.0.1.

    Args:
        compose: Resolved compose document.

    Returns:
        One message per offending mapping.
    """
    problems = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: port {port!r} is not bound to 127.0.0.1")
    return problems


def image_tag_problems(images: dict[str, str]) -> list[str]:
    """Image references without a pinned tag.

    Args:
        images: Where the reference appears -> the image reference.

    Returns:
        One message per unpinned image.
    """
    problems = []
    for where, ref in images.items():
        if "@sha256:" in ref:
            continue
        last = ref.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        if not tag:
            problems.append(f"{where}: {ref!r} has no tag")
        elif tag == "latest" or tag.endswith("-latest") or not re.search(r"\d", tag):
            problems.append(f"{where}: {ref!r} is not a pinned version tag")
    return problems


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Split a Dockerfile into (INSTRUCTION, arguments), joining continuation lines.

    Args:
        text: Dockerfile text.

    Returns:
        The instructions in order.
    """
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Sources of COPY/ADD instructions that read the build context (not ``--from`` stages).

    Args:
        instructions: Output of :func:`dockerfile_instructions`.

    Returns:
        Context-relative source paths.
    """
    sources = []
    for keyword, args in instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        tokens = shlex.split(args) if not args.startswith("[") else yaml.safe_load(args)
        if any(token.startswith("--from") for token in tokens):
            continue
        paths = [token for token in tokens if not token.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
            continue
        char = pattern[i]
        out += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether a context path is left out by .dockerignore rules (last matching rule wins).

    Args:
        patterns: The rules, comments removed.
        path: Context-relative POSIX path.

    Returns:
        True when the path is not sent to the builder.
    """
    candidates = [str(PurePosixPath(path))] + [str(p) for p in PurePosixPath(path).parents if str(p) != "."]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = (raw[1:] if negate else raw).strip().strip("/")
        regex = _glob_regex(pattern)
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def build_problems(compose: dict[str, Any], compose_dir: Path) -> list[str]:
    """Missing build contexts, Dockerfiles, COPY sources, or sources the .dockerignore drops.

    Args:
        compose: Resolved compose document.
        compose_dir: Folder of the compose file (relative paths start there).

    Returns:
        One message per problem.
    """
    problems, seen = [], set()
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue
        context = (compose_dir / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if (context, dockerfile) in seen:
            continue  # several services build the same image
        seen.add((context, dockerfile))
        if not dockerfile.is_file():
            problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
            continue
        ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
        if not ignore_file.is_file():
            ignore_file = context / ".dockerignore"
        patterns = []
        if ignore_file.is_file():
            patterns = [
                line.strip()
                for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
        for source in copy_sources(dockerfile_instructions(dockerfile.read_text())):
            target = context / source
            if not target.exists():
                problems.append(f"{name}: COPY source {source!r} missing from context {context}")
                continue
            files = [target] if target.is_file() else [
                f for f in target.rglob("*") if f.is_file() and "__pycache__" not in f.parts
            ]
            if not files:
                problems.append(f"{name}: COPY source {source!r} is an empty folder")
            for file in files:
                relative = file.relative_to(context).as_posix()
                if dockerignore_excludes(patterns, relative):
                    problems.append(f"{name}: {relative} is copied but excluded by {ignore_file.name}")
    return problems


def dockerfile_user_problems(text: str, where: str) -> list[str]:
    """A Dockerfile whose final USER is missing or root.

    Args:
        text: Dockerfile text.
        where: Name for messages.

    Returns:
        Zero or one message.
    """
    users = [args for keyword, args in dockerfile_instructions(text) if keyword == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        return [f"{where}: the image does not end with a non-root USER"]
    return []


def secret_problems(compose_text: str, env_example: dict[str, str]) -> list[str]:
    """Secrets committed in the compose file or in .env.example.

    Args:
        compose_text: Raw compose text.
        env_example: Parsed .env.example.

    Returns:
        One message per committed secret.
    """
    problems = [
        f".env.example: {key} is a secret and must be empty"
        for key, value in env_example.items()
        if SECRET_NAME.search(key) and value
    ]
    raw = yaml.safe_load(compose_text)
    for name, service in raw["services"].items():
        environment = service.get("environment") or {}
        items = environment.items() if isinstance(environment, dict) else (
            item.partition("=")[::2] for item in environment
        )
        for key, value in items:
            if not SECRET_NAME.search(key) or key in NOT_SECRETS:
                continue
            value = str(value)
            # A secret must come from .env, with no default that would become a committed secret.
            for match in _REFERENCE.finditer(value):
                if (match.group("op") or "") in (":-", "-") and match.group("arg"):
                    problems.append(f"{name}: {key} has a committed default")
            if not referenced_variables(value):
                problems.append(f"{name}: {key} is a literal, not read from .env")
    return problems


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(env_example: dict[str, str]) -> dict[str, Any]:
    return load_compose(COMPOSE, filled_env(ENV_EXAMPLE))


def _compose_client() -> list[str] | None:
    """The first compose client that works here (v2 plugin, then v1), or None."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        probe = subprocess.run([*command, "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return command
    return None


# ---------------------------------------------------------------- the stack as committed


def test_compose_parses_and_has_the_stack(compose: dict[str, Any]) -> None:
    expected = {
        "postgres", "minio", "minio-init", "prefect-server", "mlflow",
        "worker", "worker-cpu", "dask-scheduler", "dask-gpu-worker-0", "dask-gpu-worker-1",
    }
    assert expected <= set(compose["services"]), expected - set(compose["services"])


def test_every_variable_is_documented_in_env_example(env_example: dict[str, str]) -> None:
    missing = referenced_variables(COMPOSE.read_text()) - set(env_example)
    assert not missing, f"variables used by compose.yaml but missing from .env.example: {sorted(missing)}"
    # Each assignment (or group of adjacent assignments) sits under a comment that explains it.
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^[A-Z_0-9]+=", line):
            above = index - 1
            while above >= 0 and re.match(r"^[A-Z_0-9]+=", lines[above]):
                above -= 1
            assert above >= 0 and lines[above].startswith("#"), f".env.example: {line} has no comment"


def test_no_secret_is_committed(env_example: dict[str, str]) -> None:
    assert secret_problems(COMPOSE.read_text(), env_example) == []
    tracked = subprocess.run(
        ["git", "ls-files", "--", ".env", "docker/.env"], cwd=ROOT, capture_output=True, text=True
    )
    if tracked.returncode == 0:
        assert tracked.stdout.strip() == "", "a .env file is tracked by git"


def test_env_file_is_gitignored() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, "add '.env' to .gitignore: it holds the stack's secrets"


def test_ports_are_bound_to_localhost(compose: dict[str, Any]) -> None:
    assert port_problems(compose) == []
    assert any(service.get("ports") for service in compose["services"].values())


def test_image_tags_are_pinned(compose: dict[str, Any]) -> None:
    images = {f"service {name}": s["image"] for name, s in compose["services"].items() if "image" in s}
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        for keyword, args in dockerfile_instructions(dockerfile.read_text()):
            if keyword == "FROM":
                images[dockerfile.name] = args.split()[0]
    assert len(images) >= 10
    assert image_tag_problems(images) == []
    # Pulled images (no build section) need a real version in the tag, not just a name.
    for name, service in compose["services"].items():
        if "build" not in service:
            assert re.search(r":[^/]*\d", service["image"]), name


def test_built_images_copy_only_existing_files(compose: dict[str, Any]) -> None:
    assert build_problems(compose, DOCKER) == []


def test_images_run_as_non_root() -> None:
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        assert dockerfile_user_problems(dockerfile.read_text(), dockerfile.name) == []


def test_worker_image_has_cpu_and_gpu_variants(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    text = (DOCKER / "worker.Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=gpu$", text, re.MULTILINE)
    assert 'gpu) extras="gpu,dask"' in text and 'cpu) extras="dask"' in text
    tag = env_example["PNEUMO_IMAGE_TAG"]
    for service, variant in (("worker", "gpu"), ("worker-cpu", "cpu"), ("dask-gpu-worker-0", "gpu")):
        spec = compose["services"][service]
        assert spec["build"]["args"]["VARIANT"] == variant
        assert spec["build"]["dockerfile"] == "docker/worker.Dockerfile"
        assert spec["image"] == f"pneumo-worker:{tag}-{variant}"


def test_gpu_services_reserve_nvidia_devices(compose: dict[str, Any]) -> None:
    for name in GPU_SERVICES:
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia", name
        assert devices[0]["capabilities"] == ["gpu"], name
        assert ("count" in devices[0]) != ("device_ids" in devices[0]), f"{name}: count xor device_ids"
    dask_gpus = [
        compose["services"][name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name in ("dask-gpu-worker-0", "dask-gpu-worker-1")
    ]
    assert dask_gpus[0] != dask_gpus[1], "two Dask GPU workers on the same GPU"
    assert "deploy" not in compose["services"]["worker-cpu"]
    assert compose["services"]["worker"]["profiles"] == ["gpu"]
    assert compose["services"]["worker-cpu"]["profiles"] == ["cpu"]


def test_dask_workers_declare_one_gpu_resource(compose: dict[str, Any]) -> None:
    for name in ("dask-gpu-worker-0", "dask-gpu-worker-1"):
        command = compose["services"][name]["command"]
        assert command[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"], name
        assert command[command.index("--resources") + 1] == "GPU=1"
        assert command[command.index("--nthreads") + 1] == "1"
    scheduler = compose["services"]["dask-scheduler"]["command"]
    assert scheduler[:2] == ["dask", "scheduler"] and "8786" in scheduler


def test_health_checks_volumes_and_mounts(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        if name not in ONE_SHOT_SERVICES:
            assert "healthcheck" in service, f"{name} has no health check"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in compose["services"][dependency], dependency
    assert compose["services"]["minio-init"]["restart"] == "no"


def test_worker_environment_matches_what_the_code_reads(compose: dict[str, Any]) -> None:
    for name in WORKER_SERVICES:
        environment = compose["services"][name]["environment"]
        assert CODE_ENV <= set(environment), f"{name} misses {sorted(CODE_ENV - set(environment))}"
        assert environment["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert environment["AWS_ENDPOINT_URL_S3"] == environment["PNEUMO_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_pneumo_settings_read_the_worker_environment(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pneumo.config import Settings

    environment = compose["services"]["worker"]["environment"]
    for key in [k for k in os.environ if k.startswith(("PNEUMO_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.home == Path("/var/lib/pneumo")
    assert settings.tracking_uri == "http://mlflow:5000"
    assert settings.s3_endpoint_url == "http://minio:9000"


def test_services_share_database_and_bucket_names(compose: dict[str, Any]) -> None:
    services = compose["services"]
    db = services["postgres"]["environment"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://{db['PREFECT_DB_USER']}:{db['PREFECT_DB_PASSWORD']}@postgres:5432/{db['PREFECT_DB_NAME']}"
    )
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql+psycopg2://{db['MLFLOW_DB_USER']}:{db['MLFLOW_DB_PASSWORD']}@postgres:5432/{db['MLFLOW_DB_NAME']}"
    )
    command = services["mlflow"]["command"]
    bucket = services["minio-init"]["environment"]["MLFLOW_ARTIFACT_BUCKET"]
    assert command[command.index("--artifacts-destination") + 1] == f"s3://{bucket}/"
    assert "--serve-artifacts" in command
    # The MLflow server must accept the Host header the workers send.
    assert "mlflow:5000" in services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    # Workers and the MLflow server use the application account that minio-init creates.
    app_key = services["minio-init"]["environment"]["PNEUMO_S3_ACCESS_KEY_ID"]
    for name in ("worker", "mlflow"):
        assert services[name]["environment"]["AWS_ACCESS_KEY_ID"] == app_key


def test_shell_scripts_parse() -> None:
    scripts = sorted(DOCKER.rglob("*.sh"))
    assert len(scripts) >= 3
    for script in scripts:
        result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_init_env_fills_every_secret(tmp_path: Path, env_example: dict[str, str]) -> None:
    target = tmp_path / ".env"
    subprocess.run(["sh", str(INIT_ENV), str(target)], check=True, capture_output=True)
    generated = parse_env_file(target)
    assert set(generated) == set(env_example)
    for key, value in env_example.items():
        if SECRET_NAME.search(key):
            assert len(generated[key]) >= 32, key
        else:
            assert generated[key] == value, key
    assert re.fullmatch(r"admin:[0-9a-f]{48}", generated["PREFECT_AUTH_STRING"])
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    again = subprocess.run(["sh", str(INIT_ENV), str(target)], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("no compose client here (docker compose / docker-compose); structural checks only")
    env_file = tmp_path / ".env"
    subprocess.run(["sh", str(INIT_ENV), str(env_file)], check=True, capture_output=True)
    ok = subprocess.run(
        [*client, "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    # .env.example as committed has empty secrets: the stack refuses to start without them.
    refused = subprocess.run(
        [*client, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True,
    )
    assert refused.returncode != 0 and "in .env" in refused.stderr
    # The client's schema check catches a misspelt key.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devicez"] = []
    broken_file = tmp_path / "compose.yaml"
    broken_file.write_text(yaml.safe_dump(broken))
    rejected = subprocess.run(
        [*client, "--env-file", str(env_file), "--project-directory", str(DOCKER),
         "-f", str(broken_file), "config", "-q"],
        capture_output=True, text=True,
    )
    assert rejected.returncode != 0 and "devicez" in rejected.stderr


# ---------------------------------------------------------------- the checks fail on broken copies


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET}-${EMPTY:-d}-${EMPTY-d}-${UNSET-d}-$$HOME-$SET", env) == "x-d--d-$HOME-x"
    with pytest.raises(InterpolationError, match="EMPTY: fill me"):
        interpolate("${EMPTY:?fill me}", env)
    assert referenced_variables("$${NOT} ${A:-b} $C") == {"A", "C"}


def test_undocumented_variable_is_caught(env_example: dict[str, str]) -> None:
    text = COMPOSE.read_text().replace("PNEUMO_HOME: /var/lib/pneumo", "PNEUMO_HOME: ${PNEUMO_HOME_DIR}")
    assert referenced_variables(text) - set(env_example) == {"PNEUMO_HOME_DIR"}


def test_public_port_and_floating_tag_are_caught(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["ports"] = ["5000:5000", {"target": 9, "published": 9, "host_ip": "0.0.0.0"}]
    assert len(port_problems(broken)) == 2
    problems = image_tag_problems({"a": "minio/minio", "b": "postgres:latest", "c": "prefecthq/prefect:3-latest",
                                   "d": "python:slim", "e": "localhost:5000/x:1.2"})
    assert [p.split(":")[0] for p in problems] == ["a", "b", "c", "d"]


def test_missing_or_ignored_copy_source_is_caught(tmp_path: Path, compose: dict[str, Any]) -> None:
    context = tmp_path / "ctx"
    (context / "pkg").mkdir(parents=True)
    (context / "pkg" / "mod.py").write_text("")
    (context / "app.Dockerfile").write_text(
        "FROM python:3.11.13-slim\nCOPY pkg ./pkg\nCOPY --chown=1:1 missing.txt \\\n  /x/\n"
        "COPY --from=build /out /out\nUSER app\n"
    )
    (context / "app.Dockerfile.dockerignore").write_text("*\n!pkg/\npkg/mod.py\n")
    fake = {"services": {"app": {"build": {"context": ".", "dockerfile": "app.Dockerfile"}}}}
    problems = build_problems(fake, context)
    assert any("missing.txt" in p for p in problems)
    assert any("pkg/mod.py is copied but excluded" in p for p in problems)
    assert len(problems) == 2


def test_dockerignore_rules() -> None:
    rules = ["*", "!pneumo/", "!pyproject.toml", "**/__pycache__"]
    assert not dockerignore_excludes(rules, "pneumo/config.py")
    assert not dockerignore_excludes(rules, "pyproject.toml")
    assert dockerignore_excludes(rules, ".venv/bin/python")
    assert dockerignore_excludes(rules, "pneumo/__pycache__/x.pyc")


def test_root_user_and_committed_secret_are_caught(env_example: dict[str, str]) -> None:
    assert dockerfile_user_problems("FROM python:3.11.13-slim\nUSER app\nUSER root\n", "x")
    assert dockerfile_user_problems("FROM python:3.11.13-slim\n", "x")
    leaked = dict(env_example, POSTGRES_PASSWORD="hunter2")
    text = COMPOSE.read_text().replace(
        "MINIO_ROOT_PASSWORD: ${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD in .env}",
        "MINIO_ROOT_PASSWORD: ${MINIO_ROOT_PASSWORD:-minio123}",
        1,
    ).replace("PREFECT_SERVER_API_AUTH_STRING: ${PREFECT_AUTH_STRING:?set PREFECT_AUTH_STRING in .env}",
              "PREFECT_SERVER_API_AUTH_STRING: admin:admin")
    problems = secret_problems(text, leaked)
    assert ".env.example: POSTGRES_PASSWORD is a secret and must be empty" in problems
    assert "minio: MINIO_ROOT_PASSWORD has a committed default" in problems
    assert "prefect-server: PREFECT_SERVER_API_AUTH_STRING is a literal, not read from .env" in problems
