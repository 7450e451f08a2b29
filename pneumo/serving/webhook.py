"""MLflow registry webhooks for the alias follower: register one, and verify the HMAC of each delivery."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from pneumo.errors import redact
from pneumo.mlflow_client import mlflow_client, one_line

EVENT = "model_version_alias.created"  # MLflow fires it for every alias set, a move or a rollback alike
MIN_MLFLOW = (3, 3)  # registry webhooks arrived in MLflow 3.3
MAX_AGE_SECONDS = 300  # older deliveries are refused: a captured request cannot be replayed later
# MLflow's delivery headers (mlflow.webhooks.constants); signature "v1,<base64 HMAC-SHA256 of id.timestamp.body>".
SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"


class WebhookUnavailable(Exception):
    """The tracking server cannot deliver webhooks to us (old MLflow, file store, refused URL): poll only."""


def _mlflow_version() -> tuple[int, ...]:
    import mlflow

    return tuple(int(part) for part in mlflow.__version__.split(".")[:2] if part.isdigit())


def register(tracking_uri: str, url: str, model_name: str, alias: str, secret: str) -> str:
    """Create a webhook that posts ``model_version_alias.created`` to ``url``; returns its id.

    Raises:
        WebhookUnavailable: with the reason (the caller keeps polling).
    """
    if _mlflow_version() < MIN_MLFLOW:
        raise WebhookUnavailable(f"MLflow {'.'.join(map(str, _mlflow_version()))} has no registry webhooks "
                                 f"(needs {'.'.join(map(str, MIN_MLFLOW))} or later)")
    try:
        webhook = mlflow_client(tracking_uri).create_webhook(
            name=f"pneumo-serve-{model_name}-{alias}-{uuid.uuid4().hex[:8]}", url=url, events=[EVENT],
            description=f"pneumo serve follows {model_name}@{alias}", secret=secret)
    except Exception as error:  # noqa: BLE001 - a file store, an old server, a URL the server refuses
        raise WebhookUnavailable(redact(one_line(error))) from None
    return str(webhook.webhook_id)


def unregister(tracking_uri: str, webhook_id: str) -> None:
    """Delete the webhook; a server that is gone or already forgot it is not an error at shutdown."""
    try:
        mlflow_client(tracking_uri).delete_webhook(webhook_id)
    except Exception:  # noqa: BLE001,S110 - best effort while shutting down
        pass


def signature(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """MLflow's webhook signature of one delivery."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verified_event(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> dict[str, Any]:
    """The delivery's JSON payload once its signature and age check out.

    Raises:
        PermissionError: unsigned, badly signed, too old, or not JSON (the message says which).
    """
    delivery, timestamp, signed = (headers.get(name, "") for name in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (delivery and timestamp and signed):
        raise PermissionError("unsigned delivery (missing MLflow signature headers)")
    try:
        text = body.decode("utf-8")
        age = abs((time.time() if now is None else now) - int(timestamp))
    except (UnicodeDecodeError, ValueError):
        raise PermissionError("malformed delivery") from None
    if not hmac.compare_digest(signed, signature(secret, delivery, timestamp, text)):
        raise PermissionError("bad signature")
    if age > MAX_AGE_SECONDS:
        raise PermissionError(f"delivery is {age:.0f} s old (more than {MAX_AGE_SECONDS} s)")
    try:
        payload = json.loads(text)
    except ValueError:
        raise PermissionError("payload is not JSON") from None
    if not isinstance(payload, dict):
        raise PermissionError("payload is not a JSON object")
    return payload


def concerns(payload: Mapping[str, Any], model_name: str, alias: str) -> bool:
    """Whether a verified payload is an alias move of the followed ``model_name@alias``."""
    data = payload.get("data") or {}
    return (f"{payload.get('entity')}.{payload.get('action')}" == EVENT and isinstance(data, dict)
            and data.get("name") == model_name and data.get("alias") == alias)
