"""Model registry: register the best candidate, gate it against the champion, move aliases safely."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo.errors import PromotionError
from pneumo.tracking import (
    SCORE_METRIC,
    TAG_CANDIDATE,
    TAG_FINGERPRINT,
    TAG_KIND,
    TAG_SERVING_MODEL,
    candidate_runs,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "pneumonia-classifier"
CHAMPION = "champion"
PREVIOUS = "previous-champion"
CHALLENGER = "challenger"
ALIASES: tuple[str, ...] = (CHAMPION, PREVIOUS, CHALLENGER)
LOCK_SUFFIX = ".promotion-lock"
LOCK_OWNER_TAG = "pneumo.lock.owner"
LOCK_EXPIRES_TAG = "pneumo.lock.expires"
LOCK_PROCESS_TAG = "pneumo.lock.process"
DECISION_TAG = "pneumo.decision"
REASON_TAG = "pneumo.decision.reason"
_EPSILON = 1e-9  # scores are means of counts: equal models must compare equal despite rounding


@dataclass(frozen=True)
class Gate:
    """Promotion gate: absolute floors plus "reaches the champion's score + margin" (TFX-style).

    Attributes:
        min_recall: floor on test recall at the model's own threshold.
        min_specificity: floor on test specificity.
        margin: how much the new test score must exceed the champion's (0 = ties promote).
        score_weight: ``w`` in the selection score ``(w·recall + specificity)/(w + 1)``.
    """

    min_recall: float = 0.95
    min_specificity: float = 0.0
    margin: float = 0.0
    score_weight: float = 2.0

    def reasons(self, candidate: Evaluation, champion: Evaluation | None) -> list[str]:
        """Why ``candidate`` may not become champion; empty when it passes."""
        found = []
        if candidate.metrics["recall"] + _EPSILON < self.min_recall:
            found.append(f"test recall {candidate.metrics['recall']:.4f} is below the floor {self.min_recall:.4f}")
        if candidate.metrics["specificity"] + _EPSILON < self.min_specificity:
            found.append(f"test specificity {candidate.metrics['specificity']:.4f} is below the floor "
                         f"{self.min_specificity:.4f}")
        if champion is not None and candidate.score + _EPSILON < champion.score + self.margin:
            found.append(f"test score {candidate.score:.4f} does not reach champion version {champion.version}'s "
                         f"{champion.score:.4f} + margin {self.margin:.4f} on the same test set")
        return found


@dataclass
class Evaluation:
    """A served model scored now on a test set, at its own stored threshold."""

    model_uri: str
    threshold: float
    metrics: dict[str, float]
    score: float
    version: str | None = None


@dataclass
class Decision(Mapping[str, Any]):
    """The outcome of one promotion attempt (also logged as ``promotion/decision.json``).

    Also a read-only mapping over :meth:`record` (``decision["version"]``, ``decision.get("outcome")``)
    so flows can pass it on as plain data.
    """

    model_name: str
    candidate: str
    run_id: str
    parent_run_id: str
    promoted: bool
    dry_run: bool
    reasons: list[str]
    validation_score: float
    evaluation: Evaluation
    champion: Evaluation | None
    version: str | None = None  # the registered version (None on a dry run)
    previous_champion: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """One line: why it was (not) promoted."""
        if self.reasons:
            return "; ".join(self.reasons)
        if self.champion is None:
            return "passed the floors; there was no champion yet"
        return (f"passed the floors and reached champion version {self.champion.version}'s score "
                f"({self.evaluation.score:.4f} ≥ {self.champion.score:.4f})")

    @property
    def outcome(self) -> str:
        """``promoted``, ``challenger`` (registered, not promoted) or ``dry-run: would …``."""
        verdict = "challenger" if self.reasons else "promoted"
        return f"dry-run: would be {verdict}" if self.dry_run else verdict

    def record(self) -> dict[str, Any]:
        """Flat JSON-ready summary (what flows, the CLI and the parent run's decision.json show)."""
        champion = self.champion
        return {
            "outcome": self.outcome, "promoted": self.promoted, "dry_run": self.dry_run, "reason": self.reason,
            "reasons": list(self.reasons), "model_name": self.model_name, "candidate": self.candidate,
            "version": self.version, "model_uri": self.evaluation.model_uri, "run_id": self.run_id,
            "parent_run_id": self.parent_run_id, "validation_score": self.validation_score,
            "score": self.evaluation.score, "threshold": self.evaluation.threshold,
            "metrics": dict(self.evaluation.metrics),
            "champion_version": champion.version if champion else None,
            "champion_score": champion.score if champion else None,
            "champion_metrics": dict(champion.metrics) if champion else None,
            "previous_champion": self.previous_champion, "aliases": dict(self.aliases),
        }

    def __getitem__(self, key: str) -> Any:
        return self.record()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record())

    def __len__(self) -> int:
        return len(self.record())


# ----------------------------------------------------------------------------- client helpers
def _client(tracking_uri: str | None) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # pyfunc.load_model("models:/…") resolves through it
    uri = tracking_uri or mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(error: BaseException) -> str:
    return str(getattr(error, "error_code", ""))


def _alias_version(client: Any, name: str, alias: str) -> Any:
    """The version an alias points to, or None (also when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if _error_code(error) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _aliases(client: Any, name: str) -> dict[str, str]:
    """``{alias: version}`` for our aliases."""
    found = {}
    for alias in ALIASES:
        version = _alias_version(client, name, alias)
        if version is not None:
            found[alias] = str(version.version)
    return found


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, description="Pneumonia vs normal chest X-ray classifier (pyfunc: images in, "
                              "probability + label out). Aliases: champion, previous-champion, challenger.")
    except MlflowException as error:
        if _error_code(error) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


# ----------------------------------------------------------------------------- lock
@dataclass
class _Holder:
    owner: str
    expires: float
    process: str


def _process_id(pid: int) -> str | None:
    """``boot-id/pid-namespace/pid/start-time`` of a running process on this machine.

    None when the process is gone or ``/proc`` is missing (not Linux): then only the expiry frees
    a crashed holder's lock. The start time tells a reused pid from the original process.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    start = stat.rpartition(")")[2].split()[19]  # field 22; the command name before ")" may hold spaces
    return f"{boot}/{namespace}/{pid}/{start}"


def _abandoned(holder: _Holder) -> str | None:
    """Why a held lock may be taken over (expired, or its holder died here), else None."""
    if holder.expires < time.time():
        return "expired"
    if _holder_is_gone(holder.process):
        return "its process is gone"
    return None


def _holder_is_gone(process: str) -> bool:
    """True when the lock's holder ran on this machine, in our pid namespace, and runs no more."""
    parts = process.split("/")
    mine = _process_id(os.getpid())
    if mine is None or len(parts) != 4 or not parts[2].isdigit() or parts[:2] != mine.split("/")[:2]:
        return False  # another machine or container: only the expiry can tell
    return _process_id(int(parts[2])) != process


def _read_lock(client: Any, lock_name: str) -> _Holder | None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock_name)
    except MlflowException as error:
        if _error_code(error) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    tags = model.tags or {}
    try:
        expires = float(tags.get(LOCK_EXPIRES_TAG, "0"))
    except ValueError:
        expires = 0.0
    return _Holder(tags.get(LOCK_OWNER_TAG, "?"), expires, tags.get(LOCK_PROCESS_TAG, ""))


@contextmanager
def promotion_lock(
    client: Any, model_name: str, *, ttl: float = 1800.0, timeout: float = 600.0, poll: float = 0.5,
) -> Iterator[str]:
    """Hold the registry-wide promotion lock of ``model_name``.

    The lock is a registered model named ``<model_name>.promotion-lock``: creating a registered
    model is an atomic insert in MLflow's store (a unique name), so exactly one of several
    concurrent creators succeeds, across processes and hosts, with no extra infrastructure.
    Tags record the owner, its process and an expiry: a lock whose holder process has died on
    this machine is taken over at once; one held from elsewhere, after ``ttl`` seconds.

    Args:
        client: an ``MlflowClient`` for the registry.
        model_name: the registered model being promoted.
        ttl: seconds after which a lock held from another machine may be taken over.
        timeout: seconds to wait for another holder before giving up.
        poll: seconds between attempts (with jitter).

    Yields:
        This holder's token.

    Raises:
        PromotionError: the lock stayed held for ``timeout`` seconds.
    """
    from mlflow.exceptions import MlflowException

    lock_name = f"{model_name}{LOCK_SUFFIX}"
    token = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={LOCK_OWNER_TAG: token, LOCK_EXPIRES_TAG: f"{time.time() + ttl:.3f}",
                      LOCK_PROCESS_TAG: _process_id(os.getpid()) or ""},
                description=f"Held while a promotion of {model_name} decides; deleted afterwards.",
            )
            break
        except MlflowException as error:
            if _error_code(error) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        holder = _read_lock(client, lock_name)
        if holder is not None and holder.owner == token:
            break  # our create succeeded but its reply was lost and the client retried
        if holder is not None and (abandoned := _abandoned(holder)):
            # Its holder crashed: take it over, re-checking the owner right before deleting so we
            # do not delete a lock someone else has just taken over.
            again = _read_lock(client, lock_name)
            if again is not None and again.owner == holder.owner:
                log.warning("taking over the promotion lock of %s left by %s (%s)", model_name, holder.owner, abandoned)
                _delete_lock(client, lock_name)
            continue
        if time.monotonic() > deadline:
            owner = holder.owner if holder else "unknown"
            raise PromotionError(f"another promotion of {model_name} holds the registry lock ({owner}); "
                                 f"gave up after {timeout:.0f} s")
        time.sleep(poll * (0.5 + random.random()))
    try:
        yield token
    finally:
        holder = _read_lock(client, lock_name)
        if holder is not None and holder.owner == token:
            _delete_lock(client, lock_name)


def _delete_lock(client: Any, lock_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock_name)
    except MlflowException as error:
        if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
            raise


# ----------------------------------------------------------------------------- evaluation
def evaluate_model(
    model_uri: str, images: Sequence[bytes], labels: Sequence[int], *, score_weight: float = 2.0,
    version: str | None = None,
) -> Evaluation:
    """Score a served (pyfunc) model on encoded test images at the threshold stored with it.

    Args:
        model_uri: ``models:/…`` or ``runs:/…`` URI of a pneumo pyfunc model.
        images: encoded JPEG/PNG bytes.
        labels: 0 NORMAL / 1 PNEUMONIA per image.
        score_weight: selection score weight.
        version: registry version, recorded in the result.
    """
    import mlflow.pyfunc

    from pneumo.evaluate import compute_metrics, selection_score

    model = mlflow.pyfunc.load_model(model_uri)
    threshold = float((model.model_config or {}).get("threshold", 0.5))
    output = model.predict(list(images))
    metrics = compute_metrics(labels, output["probability"].to_numpy(), threshold)
    return Evaluation(model_uri=model_uri, threshold=threshold, metrics=metrics, version=version,
                      score=selection_score(metrics["recall"], metrics["specificity"], score_weight))


def read_test_set(root: Path, frame: Any, subset: str = "test") -> tuple[list[bytes], list[int]]:
    """Encoded images and labels of one subset of a manifest frame (``subset`` or ``split`` column)."""
    column = "subset" if "subset" in frame.columns else "split"
    rows = frame[frame[column] == subset]
    if rows.empty:
        raise PromotionError(f"no {subset} images in the manifest: cannot evaluate before promoting")
    return [(Path(root) / path).read_bytes() for path in rows["path"]], [int(v) for v in rows["label"]]


# ----------------------------------------------------------------------------- selection
def select_best(parent_run_id: str, run_ids: Sequence[str] | None = None, *, tracking_uri: str | None = None) -> Any:
    """The finished candidate run with the highest validation selection score.

    Args:
        parent_run_id: the retraining's parent run.
        run_ids: only consider these child runs (default: every finished child).
        tracking_uri: MLflow URI.

    Raises:
        PromotionError: no candidate of this retraining produced a model.
    """
    runs = [run for run in candidate_runs(parent_run_id, tracking_uri=tracking_uri)
            if TAG_SERVING_MODEL in run.data.tags and math.isfinite(run.data.metrics.get(SCORE_METRIC, math.nan))
            and (run_ids is None or run.info.run_id in set(run_ids))]
    if not runs:
        raise PromotionError(f"retraining run {parent_run_id} has no finished candidate with a logged model")
    # Ties go to the earlier-started run, so the choice is deterministic.
    return max(runs, key=lambda run: (run.data.metrics[SCORE_METRIC], -run.info.start_time))


def latest_retraining(experiment: str, *, tracking_uri: str | None = None) -> str:
    """Run id of the most recent retraining (parent) run in ``experiment``.

    Raises:
        PromotionError: the experiment has no retraining run.
    """
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'retraining'",
                              order_by=["attributes.start_time DESC"], max_results=1) if found else []
    if not runs:
        raise PromotionError(f"no retraining run in experiment {experiment!r}")
    return runs[0].info.run_id


# ----------------------------------------------------------------------------- promotion
def promote(
    parent_run_id: str,
    candidates: Sequence[Mapping[str, Any]] | None = None,
    *,
    test_images: Sequence[bytes] | None = None,
    test_labels: Sequence[int] | None = None,
    test_root: Path | str | None = None,
    test_frame: Any = None,
    tracking_uri: str | None = None,
    registered_model: str = DEFAULT_MODEL,
    min_recall: float = 0.95,
    min_specificity: float = 0.0,
    margin: float = 0.0,
    score_weight: float = 2.0,
    dry_run: bool = False,
    lock_timeout: float = 600.0,
) -> Decision:
    """Register the retraining's best candidate and move ``champion`` only if it passes the gate.

    The candidate is evaluated first (outside the lock); then, holding the promotion lock, the
    current champion is read afresh and evaluated on the same test set, the gate decides, and
    the registry changes: pass → ``champion`` moves to the new version and the old champion
    becomes ``previous-champion``; fail → the new version gets ``challenger`` and a tag with the
    reason. The decision is logged on the parent run. If any step fails, the new version is
    deleted and the aliases are put back, so nothing half-done remains.

    Args:
        parent_run_id: the retraining's parent run.
        candidates: records with a ``run_id`` (e.g. the flow's survivors) to choose among;
            default: every finished candidate run of the retraining.
        test_images: encoded test images (the same set the champion is measured on) ...
        test_labels: ... and their labels; or instead:
        test_root: folder the manifest paths are relative to, with
        test_frame: manifest rows (``path``, ``label``; only ``subset``/``split`` == test used).
        tracking_uri: MLflow URI (default: the process-wide one).
        registered_model: registered model name.
        min_recall: floor on test recall.
        min_specificity: floor on test specificity.
        margin: the new test score must reach the champion's plus this.
        score_weight: selection score weight on recall.
        dry_run: decide and return without registering, moving aliases or logging.
        lock_timeout: seconds to wait for a concurrent promotion to finish.

    Returns:
        The :class:`Decision` (also a mapping: ``decision["outcome"]``, ``["version"]``, …).

    Raises:
        PromotionError: no candidate or test set, lock not obtained, or the registry failed
            (and was rolled back).
    """
    if test_images is None and test_root is not None and test_frame is not None:
        test_images, test_labels = read_test_set(Path(test_root), test_frame)
    test_images, test_labels = list(test_images or []), list(test_labels or [])
    gate = Gate(min_recall=min_recall, min_specificity=min_specificity, margin=margin, score_weight=score_weight)
    model_name = registered_model
    run_ids = [str(c["run_id"]) for c in candidates if c.get("run_id")] if candidates is not None else None
    if len(test_images) != len(test_labels) or not test_images:
        raise PromotionError(f"need a non-empty test set with one label per image "
                             f"(got {len(test_images)} images, {len(test_labels)} labels)")
    client = _client(tracking_uri)
    best = select_best(parent_run_id, run_ids, tracking_uri=tracking_uri)
    candidate = best.data.tags.get(TAG_CANDIDATE, best.info.run_name)
    model_uri = best.data.tags[TAG_SERVING_MODEL]
    evaluation = evaluate_model(model_uri, test_images, test_labels, score_weight=gate.score_weight)

    def decide() -> Decision:
        current = _alias_version(client, model_name, CHAMPION)
        champion = None
        if current is not None:
            champion = evaluate_model(f"models:/{model_name}/{current.version}", test_images, test_labels,
                                      score_weight=gate.score_weight, version=str(current.version))
        reasons = gate.reasons(evaluation, champion)
        return Decision(
            model_name=model_name, candidate=candidate, run_id=best.info.run_id, parent_run_id=parent_run_id,
            promoted=not reasons and not dry_run, dry_run=dry_run, reasons=reasons,
            validation_score=float(best.data.metrics[SCORE_METRIC]), evaluation=evaluation, champion=champion,
            previous_champion=champion.version if champion and not reasons else None,
        )

    if dry_run:  # read-only: no lock, no registration
        decision = decide()
        decision.aliases = _aliases(client, model_name)
        return decision

    _ensure_registered_model(client, model_name)
    with promotion_lock(client, model_name, timeout=lock_timeout):
        decision = decide()  # the champion is read under the lock: never a stale view
        _apply(client, decision, best)
    return decision


def _version_tags(decision: Decision, best: Any) -> dict[str, str]:
    metrics = decision.evaluation.metrics
    values = {
        "pneumo.selection_score": decision.validation_score,
        "pneumo.test_score": decision.evaluation.score,
        "pneumo.test_recall": metrics["recall"],
        "pneumo.test_specificity": metrics["specificity"],
        "pneumo.test_roc_auc": metrics.get("roc_auc", float("nan")),
        "pneumo.threshold": decision.evaluation.threshold,
    }
    return {
        TAG_CANDIDATE: decision.candidate,
        **{key: repr(float(value)) for key, value in values.items()},  # full precision
        TAG_FINGERPRINT: best.data.tags.get(TAG_FINGERPRINT, ""),
        "pneumo.run_id": decision.run_id,
        "pneumo.parent_run_id": decision.parent_run_id,
    }


def _description(decision: Decision, best: Any) -> str:
    metrics = decision.evaluation.metrics
    return (
        f"{decision.candidate} from retraining run {decision.parent_run_id} (candidate run {decision.run_id}). "
        f"Validation selection score {decision.validation_score:.4f}; on the test set at threshold "
        f"{decision.evaluation.threshold:.4f}: recall {metrics['recall']:.4f}, specificity "
        f"{metrics['specificity']:.4f}, score {decision.evaluation.score:.4f}. "
        f"Dataset fingerprint {best.data.tags.get(TAG_FINGERPRINT, '?')[:16]}."
    )


def _apply(client: Any, decision: Decision, best: Any) -> None:
    """Register, move aliases, tag and log; undo everything if any step fails."""
    name = decision.model_name
    before = _aliases(client, name)
    created = None
    try:
        created = client.create_model_version(
            name, source=best.data.tags[TAG_SERVING_MODEL], run_id=decision.run_id,
            tags=_version_tags(decision, best), description=_description(decision, best),
            model_id=best.data.tags[TAG_SERVING_MODEL].removeprefix("models:/"),
        )
        decision.version = str(created.version)
        if not decision.reasons:
            client.set_registered_model_alias(name, CHAMPION, decision.version)
            if decision.champion is not None:
                client.set_registered_model_alias(name, PREVIOUS, decision.champion.version)
            client.set_model_version_tag(name, decision.version, DECISION_TAG, "promoted")
        else:
            client.set_registered_model_alias(name, CHALLENGER, decision.version)
            client.set_model_version_tag(name, decision.version, DECISION_TAG, "challenger")
        client.set_model_version_tag(name, decision.version, REASON_TAG, decision.reason[:5000])
        decision.aliases = _aliases(client, name)
        _log_decision(client, decision)
    except BaseException as error:
        _undo(client, name, before, created)
        if isinstance(error, Exception):
            raise PromotionError(f"promotion of {decision.candidate} to {name} failed and was rolled back: "
                                 f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from error
        raise


def _undo(client: Any, name: str, before: dict[str, str], created: Any) -> None:
    """Put the aliases back as they were and delete the version this promotion created."""
    for alias in ALIASES:
        try:
            if alias in before:
                client.set_registered_model_alias(name, alias, before[alias])
            elif _alias_version(client, name, alias) is not None:
                client.delete_registered_model_alias(name, alias)
        except Exception:  # noqa: BLE001 - keep undoing the rest; the original error is raised
            log.exception("could not restore alias %s of %s", alias, name)
    if created is not None:
        try:
            client.delete_model_version(name, str(created.version))
        except Exception:  # noqa: BLE001
            log.exception("could not delete version %s of %s", created.version, name)


def _log_decision(client: Any, decision: Decision) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    outcome = "promoted" if decision.promoted else "challenger"
    tags = [RunTag("pneumo.promotion.decision", outcome), RunTag("pneumo.promotion.version", decision.version or ""),
            RunTag("pneumo.promotion.candidate", decision.candidate),
            RunTag("pneumo.promotion.reason", decision.reason[:5000])]
    metrics = [Metric("promotion.test_score", decision.evaluation.score, now, 0)]
    if decision.champion is not None:
        tags.append(RunTag("pneumo.promotion.champion_version", decision.champion.version or ""))
        metrics.append(Metric("promotion.champion_test_score", decision.champion.score, now, 0))
    client.log_batch(decision.parent_run_id, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory(prefix="pneumo-decision-") as tmp:
        path = Path(tmp) / "decision.json"
        path.write_text(json.dumps(decision.record(), indent=2, default=str))
        client.log_artifact(decision.parent_run_id, str(path), "promotion")


# ----------------------------------------------------------------------------- champion, rollback
def _version_info(version: Any, aliases: dict[str, str]) -> dict[str, Any]:
    tags = dict(version.tags or {})
    return {
        "model": version.name,
        "version": str(version.version),
        "aliases": sorted(alias for alias, number in aliases.items() if number == str(version.version)),
        "candidate": tags.get(TAG_CANDIDATE),
        "threshold": float(tags["pneumo.threshold"]) if "pneumo.threshold" in tags else None,
        "metrics": {key.removeprefix("pneumo."): float(value) for key, value in tags.items()
                    if key.startswith(("pneumo.test_", "pneumo.selection_score")) and _is_float(value)},
        "run_id": version.run_id,
        "parent_run_id": tags.get("pneumo.parent_run_id"),
        "source": version.source,
        "dataset_fingerprint": tags.get(TAG_FINGERPRINT),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(version.creation_timestamp / 1000)),
        "uri": f"models:/{version.name}@{CHAMPION}" if aliases.get(CHAMPION) == str(version.version)
        else f"models:/{version.name}/{version.version}",
    }


def _is_float(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def champion_info(*, tracking_uri: str | None = None, model_name: str = DEFAULT_MODEL) -> dict[str, Any] | None:
    """The current champion: version, metrics, threshold, source run; None when there is none."""
    client = _client(tracking_uri)
    version = _alias_version(client, model_name, CHAMPION)
    if version is None:
        return None
    return _version_info(version, _aliases(client, model_name))


def rollback(*, tracking_uri: str | None = None, model_name: str = DEFAULT_MODEL,
             lock_timeout: float = 600.0) -> dict[str, Any]:
    """Point ``champion`` back at ``previous-champion`` (under the promotion lock).

    The rolled-back version keeps its tags plus ``pneumo.rolled_back``; ``previous-champion``
    is removed, so a second rollback fails instead of flip-flopping.

    Returns:
        The new champion's :func:`champion_info`, plus ``rolled_back`` (the demoted version).

    Raises:
        PromotionError: there is no previous champion to go back to.
    """
    client = _client(tracking_uri)
    with promotion_lock(client, model_name, timeout=lock_timeout):
        previous = _alias_version(client, model_name, PREVIOUS)
        if previous is None:
            raise PromotionError(f"{model_name} has no {PREVIOUS} version to roll back to")
        current = _alias_version(client, model_name, CHAMPION)
        client.set_registered_model_alias(model_name, CHAMPION, str(previous.version))
        client.delete_registered_model_alias(model_name, PREVIOUS)
        if current is not None:
            client.set_model_version_tag(model_name, str(current.version), "pneumo.rolled_back",
                                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        info = _version_info(client.get_model_version(model_name, str(previous.version)),
                             _aliases(client, model_name))
    info["rolled_back"] = str(current.version) if current is not None else None
    return info
