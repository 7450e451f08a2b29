"""Rollback keeps the operator's intent, and a holder that lost the lock never writes (#25, items 2 and 12)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pneumo.cli import main
from pneumo.config import Gate
from pneumo.errors import PromotionError
from pneumo.promotion import lock, registry
from tests.plugins.mlflow_server import brightness_model, log_retraining, threshold_for
from tests.promotion.test_registry import MID, BEST, aliases, repeated_split

GATE = Gate(floors_on="point")
WAIT = 20.0


@pytest.fixture(scope="module")
def two_champions(mlflow_server) -> tuple[str, str]:
    """A model whose version 2 replaced version 1 as champion (previous-champion = 1)."""
    import uuid

    uri, name = mlflow_server.uri, f"intent-{uuid.uuid4().hex[:10]}"
    model, test = brightness_model(32), repeated_split()
    for level in (MID, BEST):
        parent = log_retraining(uri, name, model, {"cnn": (threshold_for(level), 0.9)})
        assert registry.promote(parent, test, gate=GATE, model_name=name, tracking_uri=uri).promoted
    return uri, name


@pytest.fixture
def state(two_champions):
    """Champion 2 over previous-champion 1, restored before each test (tests rewrite aliases)."""
    from mlflow import MlflowClient

    uri, name = two_champions
    client = MlflowClient(uri)
    for alias in ("challenger",):
        if alias in aliases(uri, name):
            client.delete_registered_model_alias(name, alias)
    client.set_registered_model_alias(name, "champion", "2")
    client.set_registered_model_alias(name, "previous-champion", "1")
    client.set_registered_model_tag(name, registry.PREVIOUS_TAG, "1")
    for version in ("1", "2"):
        if "pneumo.rolled_back" in client.get_model_version(name, version).tags:
            client.delete_model_version_tag(name, version, "pneumo.rolled_back")
    return uri, name, client


def test_a_rollback_that_waited_for_the_lock_refuses_when_the_champion_moved(state, capsys):
    uri, name, client = state
    outcome: dict[str, Any] = {}

    def operator() -> None:  # saw champion 2; waits behind a promotion holding the lock
        try:
            outcome["info"] = registry.rollback(name, tracking_uri=uri, expect_champion="2", lock_timeout=WAIT)
        except PromotionError as error:
            outcome["error"] = str(error)

    with lock.promotion_lock(client, name):
        waiting = threading.Thread(target=operator)
        waiting.start()
        time.sleep(1.0)  # the rollback is now polling for the lock
        client.set_registered_model_alias(name, "champion", "1")  # what the promotion holding the lock did
    waiting.join(WAIT)
    assert "info" not in outcome and "not the expected version 2 (it moved while this waited)" in outcome["error"]
    assert aliases(uri, name) == {"champion": "1", "previous-champion": "1"}  # nothing changed by the rollback
    assert "pneumo.rolled_back" not in client.get_model_version(name, "1").tags

    # The CLI: an explicit expectation that does not hold is one line and exit 2; the right one rolls back.
    client.set_registered_model_alias(name, "champion", "2")
    assert main(["rollback", "--model", name, "--tracking-uri", uri, "--expect-champion", "1"]) == 2
    assert "not the expected version 1" in capsys.readouterr().err
    assert main(["rollback", "--model", name, "--tracking-uri", uri, "--expect-champion", "2"]) == 0
    assert aliases(uri, name) == {"champion": "1"}


def test_a_promotion_killed_between_its_alias_writes_is_repaired_not_demoted(state):
    uri, name, client = state
    assert client.get_model_version(name, "2").tags[registry.REPLACES_TAG] == "1"
    # What a SIGKILL after the first alias write of version 3's promotion leaves: previous-champion = champion = 2.
    client.set_registered_model_alias(name, "previous-champion", "2")
    client.set_registered_model_tag(name, registry.PREVIOUS_TAG, "2")
    info = registry.rollback(name, tracking_uri=uri, expect_champion="2")
    # Rolled back to the version 2 replaced, not "from 2 to 2".
    assert info["version"] == "1" and info["rolled_back"] == "2" and aliases(uri, name) == {"champion": "1"}
    assert "pneumo.rolled_back" in client.get_model_version(name, "2").tags

    # The same state where the champion replaced nobody (version 1, the first): repaired, nothing to roll back to.
    client.set_registered_model_alias(name, "previous-champion", "1")
    client.set_registered_model_tag(name, registry.PREVIOUS_TAG, "1")
    with pytest.raises(PromotionError, match="no previous-champion version to roll back to"):
        registry.rollback(name, tracking_uri=uri)
    assert aliases(uri, name) == {"champion": "1"}
    assert "pneumo.rolled_back" not in client.get_model_version(name, "1").tags


def test_a_holder_that_lost_the_lock_does_not_undo_the_new_holders_promotion(state, monkeypatch):
    uri, name, client = state
    monkeypatch.setattr(lock, "_renew_until", lambda stop, lease: None)  # the holder stalls: no renewal
    before = aliases(uri, name)
    stalled = lock.promotion_lock(client, name, ttl=1.0)
    held = stalled.__enter__()
    taker = lock.promotion_lock(client, name, ttl=60.0, timeout=WAIT, poll=0.1)
    try:
        taker.__enter__()  # once the stalled lease lapsed
        client.set_registered_model_alias(name, "champion", "1")  # the new holder's promotion
        client.set_registered_model_alias(name, "challenger", "2")
        # The stalled holder's promotion failed; its undo must not write over the new holder's.
        registry._undo(registry._fenced(client, held), name, before, "1", None)
        assert aliases(uri, name) == {"champion": "1", "previous-champion": "1", "challenger": "2"}
    finally:
        taker.__exit__(None, None, None)
        stalled.__exit__(None, None, None)
