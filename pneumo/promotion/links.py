"""Addresses of MLflow UI pages, for the links in Prefect artifacts, model cards and the approval form.

MLflow's UI routes are hash routes (``#/runs/<id>``), so a link works wherever the UI is served from;
which address that is comes from :func:`mlflow_ui`.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

# What `mlflow ui` serves by default: the demo prints that command for its local (sqlite) store.
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"


def ui_address(tracking_uri: str) -> str | None:
    """The MLflow UI's base address for an HTTP tracking server (no credentials), else None."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def mlflow_ui(tracking_uri: str) -> str:
    """Where a person opens the MLflow UI: ``PNEUMO_MLFLOW_UI_URL`` when set, else the tracking server's address,
    else (a local sqlite or file store) :data:`LOCAL_MLFLOW_UI`."""
    from pneumo.config import Settings

    configured = Settings().mlflow_ui_url
    return (configured or "").rstrip("/") or ui_address(tracking_uri) or LOCAL_MLFLOW_UI


def run_url(ui: str, run_id: str) -> str:
    """A run's page (MLflow finds its experiment)."""
    return f"{ui}/#/runs/{run_id}"


def version_url(ui: str, model_name: str, version: str | int) -> str:
    """A registered version's page."""
    return f"{ui}/#/models/{quote(model_name)}/versions/{version}"


def markdown_link(text: str, url: str | None) -> str:
    """``[text](url)``, or the text alone when there is nothing to link to."""
    return f"[{text}]({url})" if url else text
