"""``pneumo serve``: MLflow's scoring protocol over the version an alias points at, swapped as the alias moves."""


import asyncio
import contextlib
import json
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

from pneumo.errors import ConfigError, redact
from pneumo.serving.follower import AliasFollower
from pneumo.serving import webhook

VERSION_HEADER = "X-Model-Version"
INCLUDE_VERSION_PARAM = "include_version"  # /invocations?include_version=true adds "model_version" to the JSON
WEBHOOK_SECRET_ENV = "PNEUMO_WEBHOOK_SECRET"


def build_app(follower: AliasFollower, *, webhook_path: str | None = None, webhook_secret: str = "",
              on_shutdown: Callable[[], None] = lambda: None, log: Callable[[str], None] = print) -> Any:
    """The FastAPI app: ``/invocations`` (MLflow's ``invocations``), ``/ping``, ``/health``, ``/version``[, webhook].

    ``on_shutdown`` runs when uvicorn shuts down: after SIGTERM uvicorn re-raises the signal once the
    app has stopped, so code after ``Server.run`` would never run.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        on_shutdown()

    app = FastAPI(title="pneumo serve", lifespan=lifespan)
    timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()

    @app.middleware("http")
    async def time_limit(request: Request, call_next: Any) -> Any:  # as MLflow's scoring server does
        try:
            return await asyncio.wait_for(call_next(request), timeout=timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return Response(content="Request processing time exceeded limit", status_code=504,
                            media_type="application/json")

    @app.get("/ping")
    async def ping() -> Response:
        return Response(content="\n", status_code=200, media_type="application/json")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(follower.health())

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse(follower.version_info())

    @app.post("/invocations")
    async def score(request: Request) -> Response:
        loaded = follower.current  # taken once: a swap during this request does not change its model
        headers = {VERSION_HEADER: loaded.version}
        body = await request.body()
        try:
            answer = await asyncio.to_thread(invocations, body, request.headers.get("content-type") or "",
                                             loaded.model, loaded.input_schema)
        except MlflowException as error:  # MLflow's own mapping: a bad image is INVALID_PARAMETER_VALUE, HTTP 400
            return Response(error.serialize_as_json(), status_code=error.get_http_status_code(),
                            media_type="application/json", headers=headers)
        content = answer.response
        if answer.status == 200 and request.query_params.get(INCLUDE_VERSION_PARAM, "").lower() in ("1", "true"):
            content = json.dumps({**json.loads(content), "model_version": loaded.version})
        return Response(content, status_code=answer.status, media_type=answer.mimetype, headers=headers)

    if webhook_path:
        @app.post(webhook_path)
        async def alias_moved(request: Request) -> JSONResponse:
            try:
                payload = webhook.verified_event(webhook_secret, request.headers, await request.body())
            except PermissionError as refused:
                log(f"webhook delivery refused: {refused}")
                return JSONResponse({"error": str(refused)}, status_code=401)
            if not webhook.concerns(payload, follower.model_name, follower.alias):
                return JSONResponse({"status": "ignored"})
            log(f"webhook: @{follower.alias} set to version {payload['data'].get('version')}; checking now")
            follower.wake()
            return JSONResponse({"status": "accepted"})

    return app


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, so a taken port or a bad host fails before minutes of model loading.

    Raises:
        ConfigError: the address cannot be used, with the reason.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(128)
    return sock


def _webhook(follower: AliasFollower, url: str, secret: str, log: Callable[[str], None]) -> str | None:
    """Register the webhook; its id, or None (the reason in ``/health``) when the server cannot deliver to us."""
    try:
        webhook_id = webhook.register(follower.tracking_uri, url, follower.model_name, follower.alias, secret)
    except webhook.WebhookUnavailable as why:
        follower.webhook = {"url": url, "unavailable": str(why)}
        log(f"no webhook ({why}); following @{follower.alias} by polling every {follower.poll_seconds:g} s")
        return None
    follower.webhook = {"url": url, "id": webhook_id}
    log(f"webhook {webhook_id} registered: MLflow posts alias moves to {url}")
    return webhook_id


def serve(tracking_uri: str, model_name: str, alias: str, *, host: str, port: int, poll_seconds: float,
          webhook_url: str | None = None, log: Callable[[str], None] = print) -> int:
    """Load ``models:/NAME@ALIAS``, serve it on ``host:port`` and follow the alias until interrupted.

    Raises:
        ConfigError: the address cannot be used. AliasNotFound: no such model or alias.
        ModelRefused: the version the alias points at now does not pass its smoke test.
    """
    import uvicorn

    # Loading must not unpickle (a pickled model could run any code); ours are packaged from code.
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    # MLflow's client retries a dead server for minutes; a poll should fail fast and try again next time.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ["MLFLOW_IS_IN_SERVING_ENVIRONMENT"] = "true"  # as MLflow's scoring server sets it
    with listen(host, port) as sock:  # bound first: a taken port fails before the model loads
        follower = AliasFollower(tracking_uri, model_name, alias, poll_seconds=poll_seconds, log=log)
        follower.start()
        secret = os.environ.get(WEBHOOK_SECRET_ENV) or secrets.token_urlsafe(32)
        webhook_id = _webhook(follower, webhook_url, secret, log) if webhook_url else None

        def shut_down() -> None:
            follower.stop()
            if webhook_id:
                webhook.unregister(tracking_uri, webhook_id)
            log("pneumo serve: stopped")

        app = build_app(follower, webhook_path=(urlparse(webhook_url).path or "/") if webhook_url else None,
                        webhook_secret=secret, on_shutdown=shut_down, log=log)
        follower.follow()
        log(f"pneumo serve: {model_name}@{alias} on http://{host}:{port} (tracking {redact(tracking_uri)}, "
            f"polling every {poll_seconds:g} s)")
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)).run(sockets=[sock])
    return 0
