"""Model registry: register a retraining's best candidate, gate it against the champion, champion and rollback.

The only module that calls MLflow's registry API (besides the lock in :mod:`pneumo.promotion.lock`); the
verdict itself is :mod:`pneumo.promotion.gate`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from pneumo.config import Gate
from pneumo.errors import PromotionError
from pneumo.evaluation.holdout import TestSet, TestSetChange, manifest_digest, test_set_change
from pneumo.mlflow_client import EXISTS, MISSING, is_transient, mlflow_client, one_line, unless
from pneumo.promotion.gate import (
    ALIASES, CHALLENGER, CHAMPION, PREVIOUS, Decision, Evaluation, compare, evaluate_model, floor_reasons, version_info,
    version_tags
)
from pneumo.promotion.audit import record_registration, recorded_test_set
from pneumo.promotion.lock import promotion_lock
from pneumo.promotion.leaderboard import why_selected
from pneumo.promotion.links import mlflow_ui
from pneumo.promotion.runs import TIE_BREAK_METRIC, ranked_candidates
from pneumo.promotion.tracking import (
    METRIC_DECIMALS, SCORE_METRIC, TAG_CANDIDATE, TAG_FINGERPRINT, TAG_SERVING_MODEL, TAG_SOURCE, flat_metrics,
    log_json, log_text, mark_registered
)
from pneumo.serving.integrity import IntegrityError, load_registered, recorded_checksums
from pneumo.serving.packaging import link_registered_version, unlink_registered_version

log = logging.getLogger(__name__)

DECISION_TAG = "pneumo.decision"
PREVIOUS_TAG = "pneumo.previous_champion"
REASON_TAG = "pneumo.decision.reason"
REPLACES_TAG = "pneumo.replaces"  # version tag: the champion a promoted version replaced (what rollback returns to)
LOAD_RETRY_DELAYS = (2.0, 8.0)  # seconds before the second and third try of a transiently failed model load
T = TypeVar("T")


# ----------------------------------------------------------------------------- helpers
def _alias_version(client: Any, name: str, alias: str) -> Any:
    """The version an alias points to, or None (also when the model does not exist)."""
    return unless(MISSING + ("INVALID_PARAMETER_VALUE", "NOT_FOUND"),
                  lambda: client.get_model_version_by_alias(name, alias))


def _aliases(client: Any, name: str) -> dict[str, str]:
    """``{alias: version}`` for our aliases."""
    return {alias: str(version.version) for alias in ALIASES
            if (version := _alias_version(client, name, alias)) is not None}


def _ensure_registered_model(client: Any, name: str) -> None:
    unless(EXISTS, lambda: client.create_registered_model(
        name, description="Pneumonia vs normal chest X-ray classifier (pyfunc: images in, "
                          "probability + label out). Aliases, moved by each promotion: champion (the version "
                          "served), challenger (the newest version that did not pass the gate) and, from the second "
                          "promotion on, previous-champion (the version champion replaced; `pneumo rollback` "
                          "returns to it)."))


def _recorded(client: Any, version: Any) -> dict[str, str] | None:
    """The champion's recorded checksums (None, with a warning, for a version registered before them)."""
    expected = recorded_checksums(client, version)
    if expected is None:
        log.warning("%s version %s has no recorded checksums: scored unverified", version.name, version.version)
    return expected


def _own_model(client: Any, run: Any) -> str:
    """The served model a candidate run logged; refuses a tag that points at another run's model."""
    uri = run.data.tags[TAG_SERVING_MODEL]
    source_run = client.get_logged_model(uri.removeprefix("models:/")).source_run_id
    if source_run != run.info.run_id:
        raise PromotionError(f"its model {uri} was logged by run {source_run}, not by this candidate")
    return uri


def _retrying_transient(call: Callable[[], T], what: str, delays: Sequence[float] | None = None) -> T:
    """``call()``, again after each of ``delays`` seconds (:data:`LOAD_RETRY_DELAYS`) while it fails
    transiently (:func:`~pneumo.mlflow_client.is_transient`)."""
    for delay in (*(LOAD_RETRY_DELAYS if delays is None else delays), None):
        try:
            return call()
        except Exception as error:
            if delay is None or not is_transient(error):
                raise
            log.warning("%s failed transiently (%s); trying again in %.0f s", what, one_line(error), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _evaluate_best(client: Any, ranked: Sequence[Any], test: TestSet, gate: Gate) -> tuple[Any, Evaluation, list[str]]:
    """The best-ranked candidate whose model loads and scores, and why better-ranked ones were skipped.

    A transient failure (a dropped download, a 503) is retried first: a blip must not change the winner.
    """
    skipped: list[str] = []
    for run in ranked:
        try:
            return run, _retrying_transient(lambda: evaluate_model(_own_model(client, run), test, gate),
                                            f"loading candidate run {run.info.run_id}"), skipped
        except Exception as error:  # noqa: BLE001 - a broken candidate must not block the next one
            name = run.data.tags.get(TAG_CANDIDATE, run.info.run_name)
            skipped.append(f"{name} (run {run.info.run_id}): {one_line(error)}")
            log.warning("skipping candidate %s: its model could not be evaluated", name)
    raise PromotionError("no candidate's model could be loaded and evaluated: " + "; ".join(skipped))


# ----------------------------------------------------------------------------- promotion
def promote(
    parent_run_id: str, test: TestSet, *, gate: Gate, model_name: str, run_ids: Collection[str] | None = None,
    tracking_uri: str | None = None, dry_run: bool = False, lock_timeout: float = 600.0,
    approval: dict[str, Any] | None = None, withhold: str | None = None,
) -> Decision:
    """Register the retraining's best candidate and move ``champion`` only if it passes the gate.

    The best-ranked candidate whose model loads is evaluated first, outside the lock. Holding the
    promotion lock, the current champion is read afresh and scored on the same test images, the
    gate decides (floors, then the paired test of :mod:`pneumo.evaluation.stats`), and the registry changes:
    pass → ``champion`` moves to the new version and the old one becomes ``previous-champion``;
    otherwise the new version gets ``challenger`` and a tag with the reason. The decision is logged
    on the parent run. If any step fails, the new version is deleted and the aliases are put back.
    ``run_ids`` limits which child runs compete; ``dry_run`` decides without writing anything.
    The version's audit record (:mod:`pneumo.promotion.audit`) holds ``approval`` (who signed off);
    ``withhold`` (a person rejected it, or nobody answered) registers it as challenger whatever the gate says.
    When the test split changed since the champion's promotion, the comparison uses the images both hold.

    Raises:
        PromotionError: no candidate or test set, lock not obtained, or the registry failed (rolled back).
    """
    if not test.images or not len(test.images) == len(test.labels) == len(test.patients):
        raise PromotionError(f"need a non-empty test set with one label and patient per image (got "
                             f"{len(test.images)} images, {len(test.labels)} labels, {len(test.patients)} patients)")
    client = mlflow_client(tracking_uri)
    ranked = ranked_candidates(parent_run_id, run_ids, tracking_uri=tracking_uri)
    best, evaluation, skipped = _evaluate_best(client, ranked, test, gate)

    def decide() -> Decision:
        current = _alias_version(client, model_name, CHAMPION)
        try:
            champion = None if current is None else evaluate_model(
                f"models:/{model_name}/{current.version}", test, gate, version=str(current.version),
                expected=_recorded(client, current))
        except IntegrityError as error:  # never compare against, or replace unseen, a champion someone changed
            raise PromotionError(f"champion version {current.version} cannot be compared: {error}; restore its "
                                 "files or roll back before promoting") from None
        recorded, change, shared = _test_set_against(client, current, test)
        decision = Decision(
            model_name=model_name, candidate=best.data.tags.get(TAG_CANDIDATE, best.info.run_name),
            run_id=best.info.run_id, parent_run_id=parent_run_id, dry_run=dry_run,
            reasons=floor_reasons(gate, evaluation), validation_score=float(best.data.metrics[SCORE_METRIC]),
            evaluation=evaluation, champion=champion, gate=gate,
            comparison=compare(test, evaluation, champion, gate, on=shared),
            n_test_images=len(test.images), n_test_patients=len(set(test.patients)), skipped=skipped,
            test_set_digest=test.digest(), champion_test_set_digest=recorded, test_change=change,
            compared_on_shared=shared is not None, withheld=withhold,
        )
        decision.selected_because = why_selected(_ranked_summaries(ranked), decision.record()) or ""
        return decision

    if dry_run:  # read-only: no lock, no registration
        decision = decide()
        decision.aliases = _aliases(client, model_name)
        return decision
    _ensure_registered_model(client, model_name)
    with promotion_lock(client, model_name, timeout=lock_timeout) as lease:
        decision = decide()  # the champion is read under the lock: never a stale view
        _apply(client, decision, best, lease, test, approval)
    try:  # after the lock: a label in the runs table, not part of the promotion
        mark_registered(client, decision.run_id, model_name, decision.version, decision.outcome)
    except Exception as error:  # noqa: BLE001 - the version is registered; only the label is missing
        log.warning("candidate run %s not marked as registered: %s", decision.run_id, one_line(error))
    return decision


def _ranked_summaries(ranked: Sequence[Any]) -> list[dict[str, Any]]:
    """The ranked candidate runs as the leaderboard's summaries (what :func:`why_selected` reads)."""
    return [{"name": run.data.tags.get(TAG_CANDIDATE, run.info.run_name), "status": "ok",
             "score": run.data.metrics[SCORE_METRIC], "validation": {"roc_auc": run.data.metrics.get(TIE_BREAK_METRIC)}}
            for run in ranked]


def _test_set_against(client: Any, champion: Any, test: TestSet) -> tuple[str | None, TestSetChange | None,
                                                                           list[int] | None]:
    """The champion's recorded test-set digest, how the current split differs from it, and the indices to
    compare on: those both hold, when each class keeps at least two shared images (else all: None)."""
    if champion is None:
        return None, None, None
    try:
        rows = recorded_test_set(client, champion)
    except IntegrityError as error:  # comparing is still possible on the current split; say why not on the locked one
        log.warning("%s; comparing on the current test split", error)
        rows = None
    if rows is None:
        return None, None, None
    recorded = manifest_digest(rows)
    if recorded == test.digest():
        return recorded, None, None
    change = test_set_change(rows, test.manifest())
    per_class = [sum(1 for index in change.shared if test.labels[index] == label) for label in (0, 1)]
    return recorded, change, change.shared if min(per_class) >= 2 else None


def _card(client: Any, decision: Decision, best: Any, approval: dict[str, Any] | None) -> str:
    """The version's model card, from the candidate run (all its numbers: ``metrics.json``), the
    retraining's data report and the sign-off."""
    from pneumo.promotion.model_card import model_card

    report = _artifact_json(client, decision.parent_run_id, "data_report.json", "the card omits the counts")
    saved = _artifact_json(client, decision.run_id, "metrics.json", "the card shows only its headline metrics")
    return model_card(decision.record(), best.data.params, flat_metrics(saved) if saved else best.data.metrics,
                      report, best.data.tags.get(TAG_SOURCE, "?"), best.data.tags.get(TAG_FINGERPRINT, ""),
                      approval=approval, mlflow_ui=mlflow_ui(client.tracking_uri))


def _artifact_json(client: Any, run_id: str, path: str, without: str) -> Any:
    """A run's JSON artifact, or None (with a warning saying what is left out) when it cannot be read."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="pneumo-card-") as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
        except Exception:  # noqa: BLE001 - a run logged without it still gets a card
            log.warning("run %s has no readable %s; %s", run_id, path, without)
            return None


def _apply(client: Any, decision: Decision, best: Any, lease: Any, test: TestSet,
           approval: dict[str, Any] | None) -> None:
    """Register, move aliases, tag and log; undo everything if any step fails.

    ``lease.ensure_held()`` before each registry write: a holder that lost its lease (it stalled
    past the ttl and someone took over) stops instead of writing over the new holder's work.
    """
    name = decision.model_name
    before = _aliases(client, name)
    remembered = (client.get_registered_model(name).tags or {}).get(PREVIOUS_TAG)
    write = _fenced(client, lease)
    created = None
    try:
        source, card = best.data.tags[TAG_SERVING_MODEL], _card(client, decision, best, approval)
        # The checksums of the files the gate scored (every later load is verified against them), the
        # locked test set and the audit bundle.
        tags = {**version_tags(decision, best.data.tags.get(TAG_FINGERPRINT, "")),
                **record_registration(client, decision, best, test, approval)}
        if decision.promoted and decision.champion is not None:
            tags[REPLACES_TAG] = str(decision.champion.version)
        lease.ensure_held()
        created = client.create_model_version(name, source=source, run_id=decision.run_id, tags=tags,
                                              description=card, model_id=source.removeprefix("models:/"))
        # What mlflow.register_model writes and create_model_version skips: the UI's "Registered models" column.
        link_registered_version(client, source.removeprefix("models:/"), name, created.version)
        log_text(client, decision.run_id, "model_card.md", card)
        decision.version = str(created.version)
        verdict = decision.outcome
        if decision.promoted:
            # previous-champion first: a kill between the two writes leaves champion == previous-champion,
            # which rollback recognises and repairs (the new version's REPLACES_TAG names the real predecessor).
            if decision.champion is not None:
                write.set_registered_model_alias(name, PREVIOUS, decision.champion.version)
                # Deleting a version drops its aliases; the tag remembers it so rollback can say so.
                write.set_registered_model_tag(name, PREVIOUS_TAG, decision.champion.version)
            write.set_registered_model_alias(name, CHAMPION, decision.version)
        else:
            write.set_registered_model_alias(name, CHALLENGER, decision.version)
        write.set_model_version_tag(name, decision.version, DECISION_TAG, verdict)
        write.set_model_version_tag(name, decision.version, REASON_TAG, decision.reason[:5000])
        decision.aliases = _aliases(client, name)
        _log_decision(client, decision)
    except BaseException as error:
        _undo(write, name, before, remembered, created)
        if isinstance(error, Exception):
            raise PromotionError(f"promotion of {decision.candidate} to {name} failed and was rolled back: "
                                 f"{one_line(error)}") from error
        raise


class _fenced:
    """The client's registry writes, each after ``lease.ensure_held()``: a holder that lost the lock
    (it stalled past its lease and someone took over) raises instead of overwriting the new holder's work."""

    def __init__(self, client: Any, lease: Any) -> None:
        self._client, self._lease = client, lease

    def __getattr__(self, method: str) -> Any:
        def fenced(*args: Any, **kwargs: Any) -> Any:
            self._lease.ensure_held()
            return getattr(self._client, method)(*args, **kwargs)

        found = getattr(self._client, method)
        # Everything but reads: a write method of any name (update_, rename_, transition_) is fenced too.
        return found if method.startswith(("get_", "search_")) or not callable(found) else fenced


def _undo(write: _fenced, name: str, before: dict[str, str], remembered: str | None, created: Any) -> None:
    """Put the aliases and the previous-champion tag back as they were and delete the version this
    promotion created; stop at once if the lock was lost (the registry is then the new holder's)."""

    def attempt(what: str, step: Callable[[], Any]) -> None:
        try:
            step()
        except PromotionError:  # the lock is lost: stop undoing
            raise
        except Exception:  # noqa: BLE001 - keep undoing the rest; the original error is raised
            log.exception("could not restore %s of %s", what, name)

    def restore_alias(alias: str) -> None:
        if alias in before:
            write.set_registered_model_alias(name, alias, before[alias])
        elif _alias_version(write, name, alias) is not None:
            write.delete_registered_model_alias(name, alias)

    def restore_tag() -> None:
        if (write.get_registered_model(name).tags or {}).get(PREVIOUS_TAG) == remembered:
            return
        if remembered is None:
            write.delete_registered_model_tag(name, PREVIOUS_TAG)
        else:
            write.set_registered_model_tag(name, PREVIOUS_TAG, remembered)

    try:
        for alias in ALIASES:
            attempt(f"alias {alias}", lambda alias=alias: restore_alias(alias))
        attempt(f"tag {PREVIOUS_TAG}", restore_tag)
        if created is not None:
            attempt(f"version {created.version}", lambda: write.delete_model_version(name, str(created.version)))
            attempt(f"the link of version {created.version}", lambda: unlink_registered_version(
                write, created.source.removeprefix("models:/"), name, created.version))
    except PromotionError as lost:  # never undo over another holder's promotion
        log.error("%s: left the registry of %s as the new holder has it", lost, name)


def _log_decision(client: Any, decision: Decision) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    tags = [RunTag("pneumo.promotion.decision", decision.outcome),
            RunTag("pneumo.promotion.version", decision.version or ""),
            RunTag("pneumo.promotion.candidate", decision.candidate),
            RunTag("pneumo.promotion.reason", decision.reason[:5000])]
    # The selected candidate's score on the parent too: a folded runs table can sort retrainings by it.
    values = {"promotion.test_score": decision.evaluation.score, SCORE_METRIC: decision.validation_score}
    if decision.champion is not None:
        tags.append(RunTag("pneumo.promotion.champion_version", decision.champion.version or ""))
        values["promotion.champion_test_score"] = decision.champion.score
    if (comparison := decision.comparison) is not None:
        values.update({f"promotion.score_diff{suffix}": value for suffix, value in
                       (("", comparison.diff), (".ci_low", comparison.low), (".ci_high", comparison.high))})
    # Rounded as the candidate runs' metrics are: what a person compares (decision.json has them exact).
    metrics = [Metric(key, round(value, METRIC_DECIMALS), now, 0) for key, value in values.items()]
    client.log_batch(decision.parent_run_id, metrics=metrics, tags=tags)
    log_json(client, decision.parent_run_id, "decision.json", decision.record(), "promotion")


# ----------------------------------------------------------------------------- champion, rollback
def champion_info(model_name: str, *, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The current champion: version, metrics, threshold, source run; None when there is none."""
    client = mlflow_client(tracking_uri)
    version = _alias_version(client, model_name, CHAMPION)
    return None if version is None else version_info(version, _aliases(client, model_name))


def _no_previous(client: Any, model_name: str) -> str:
    """Why there is nothing to roll back to: never a previous champion, or it was deleted."""
    from mlflow.exceptions import MlflowException

    try:
        remembered = (client.get_registered_model(model_name).tags or {}).get(PREVIOUS_TAG)
    except MlflowException:
        remembered = None
    if remembered:
        try:
            client.get_model_version(model_name, remembered)
        except MlflowException:
            return f"{model_name} version {remembered}, the previous champion, was deleted: nothing to roll back to"
    return f"{model_name} has no {PREVIOUS} version to roll back to"


def _repair_interrupted(client: Any, write: _fenced, model_name: str) -> Any:
    """``previous-champion`` as rollback should see it, after repairing a promotion killed between its two
    alias writes (champion == previous-champion): previous-champion goes back to the version the champion
    replaced when it was promoted, or is removed when that is unknown or deleted."""
    from mlflow.exceptions import MlflowException

    previous, current = _alias_version(client, model_name, PREVIOUS), _alias_version(client, model_name, CHAMPION)
    if previous is None or current is None or str(previous.version) != str(current.version):
        return previous
    replaced = dict(current.tags or {}).get(REPLACES_TAG)
    try:
        restored = client.get_model_version(model_name, replaced) if replaced else None
    except MlflowException:
        restored = None
    if restored is None:
        write.delete_registered_model_alias(model_name, PREVIOUS)
        write.delete_registered_model_tag(model_name, PREVIOUS_TAG)
        log.warning("%s: previous-champion pointed at the champion (version %s), left by an interrupted promotion; "
                    "removed it (the version before is unknown)", model_name, current.version)
        return None
    write.set_registered_model_alias(model_name, PREVIOUS, str(restored.version))
    write.set_registered_model_tag(model_name, PREVIOUS_TAG, str(restored.version))
    log.warning("%s: previous-champion pointed at the champion (version %s), left by an interrupted promotion; "
                "repaired it to version %s, the one the champion replaced", model_name, current.version,
                restored.version)
    return client.get_model_version(model_name, str(restored.version))


def rollback(model_name: str, *, tracking_uri: str | None = None, lock_timeout: float = 600.0,
             expect_champion: str | None = None) -> dict[str, Any]:
    """Point ``champion`` back at ``previous-champion`` under the promotion lock; returns the new champion's
    :func:`champion_info` plus ``rolled_back`` (the demoted version, tagged ``pneumo.rolled_back``).

    ``previous-champion`` is removed, so a second rollback fails instead of flip-flopping.
    ``expect_champion``: the version the operator means to roll back; when a promotion moved the
    champion while this waited for the lock, nothing changes. A state an interrupted promotion left
    (champion == previous-champion) is repaired first.

    Raises:
        PromotionError: the champion is not ``expect_champion``, no previous champion (or it was deleted),
            or its model does not load (nothing changes).
    """
    client = mlflow_client(tracking_uri)
    with promotion_lock(client, model_name, timeout=lock_timeout) as lease:
        write = _fenced(client, lease)
        current = _alias_version(client, model_name, CHAMPION)
        seen = None if current is None else str(current.version)
        if expect_champion is not None and seen != str(expect_champion):
            raise PromotionError(f"{model_name}'s champion is {f'version {seen}' if seen else 'unset'}, not the "
                                 f"expected version {expect_champion} (it moved while this waited): nothing changed; "
                                 "check `pneumo champion` and run the rollback again if still wanted")
        previous = _repair_interrupted(client, write, model_name)
        if previous is None:
            raise PromotionError(_no_previous(client, model_name))
        try:
            load_registered(model_name, str(previous.version), tracking_uri=tracking_uri)
        except Exception as error:  # noqa: BLE001 - any failure means apps could not load it either
            raise PromotionError(f"{model_name} version {previous.version} ({PREVIOUS}) does not load, so the "
                                 f"champion stays: {one_line(error)}") from None
        write.set_registered_model_alias(model_name, CHAMPION, str(previous.version))
        write.delete_registered_model_alias(model_name, PREVIOUS)
        write.delete_registered_model_tag(model_name, PREVIOUS_TAG)
        if current is not None:
            write.set_model_version_tag(model_name, str(current.version), "pneumo.rolled_back",
                                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        info = version_info(client.get_model_version(model_name, str(previous.version)),
                             _aliases(client, model_name))
    info["rolled_back"] = str(current.version) if current is not None else None
    return info
