"""``pneumo serve``: MLflow's scoring protocol over the version an alias points at, swapped as the alias moves."""


import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from pneumo.data.decode import env_limit, header_size
from pneumo.errors import ConfigError, redact
from pneumo.serving.follower import AliasFollower
from pneumo.serving import webhook

VERSION_HEADER = "X-Model-Version"
INCLUDE_VERSION_PARAM = "include_version"  # /invocations?include_version=true adds "model_version" to the JSON
WEBHOOK_SECRET_ENV = "PNEUMO_WEBHOOK_SECRET"
MAX_REQUEST_BYTES_ENV = "PNEUMO_MAX_REQUEST_BYTES"
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20  # 256 base64 X-rays of ~190 kB; a larger body gets 413 unread
MAX_ERROR_CHARS = 500  # an error names the item and the rule; the payload never goes back (or into logs)
# A request whose images claim more than this share of PNEUMO_MAX_REQUEST_PIXELS (default: 10 Mpx,
# the largest Kaggle X-ray) is heavy: heavy requests decode one at a time (one decode already uses
# every core), queued ones wait without a thread and give up at their deadline, so they cannot
# starve small requests of threads or CPU.
HEAVY_SHARE = 10
TIMEOUT_MESSAGE = "request processing time exceeded limit (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)"
_ECHOED_DATA = "Failed to predict data '"  # MLflow prefixes a model error with the whole parsed input
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/=_-]{33,}")  # base64 or any other long run copied from a payload


def error_json(message: str, error_code: str = "INVALID_PARAMETER_VALUE") -> str:
    """MLflow's error JSON, without ``stack_trace`` (server paths) and with a message cut to a few lines."""
    return json.dumps({"error_code": error_code, "message": message})


def scrubbed(message: str) -> str:
    """An error message with the request taken out: MLflow's echoes of the input, long tokens, the tail."""
    if message.startswith(_ECHOED_DATA):
        message = message.rpartition("\nError: ")[2]
    message = message.split("\nInput:", 1)[0]  # MLflow's invalid-JSON error ends with the whole body
    message = _LONG_TOKEN.sub("…", message[:20 * MAX_ERROR_CHARS]).strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "… (cut)"


class _NeedsHeavySlot(BaseException):
    """Raised in a worker thread for a heavy request without the slot; not an ``Exception``, so
    MLflow's ``invocations`` (which turns every ``Exception`` into an HTTP 400) lets it through."""


class _Screened:
    """The loaded model as ``invocations`` sees it: it counts the pixels a request claims before any
    decoding, and keeps the model's own refusal, whose message MLflow would prefix with the input."""

    def __init__(self, model: Any, heavy_pixels: int, holds_slot: bool) -> None:
        self._model, self._heavy_pixels, self._holds_slot = model, heavy_pixels, holds_slot

    def __getattr__(self, name: str) -> Any:  # metadata and the rest, as the model has them
        return getattr(self._model, name)

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        from pneumo.serving.pyfunc import InvalidImageError

        try:
            if not self._holds_slot and self._claimed_pixels(data) > self._heavy_pixels:
                raise _NeedsHeavySlot
            return self._model.predict(data, params=params)
        except InvalidImageError as refused:
            refused._pneumo_refusal = refused.message  # before invocations prefixes it with the input
            raise

    @staticmethod
    def _claimed_pixels(data: Any) -> float:
        """Pixels the images' headers claim (cheap: no decoding); infinite (heavy) when they cannot be counted."""
        from pneumo.serving.pyfunc import InvalidImageError, as_encoded_images

        try:  # the model checks the items again: twice the base64 decoding, a small price next to decoding
            encoded = as_encoded_images(data)
        except InvalidImageError:
            raise
        except Exception:  # the model will refuse it its own way; until then it counts as heavy
            return float("inf")
        return sum(width * height for width, height in (header_size(item) or (0, 0) for item in encoded))


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

    from pneumo.serving.pyfunc import max_request_pixels

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        on_shutdown()

    app = FastAPI(title="pneumo serve", lifespan=lifespan)
    timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
    max_bytes = env_limit(MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES)
    heavy_pixels = max_request_pixels() // HEAVY_SHARE
    heavy_slot = asyncio.Semaphore(1)
    pool = ThreadPoolExecutor(thread_name_prefix="pneumo-score")  # as asyncio's default: min(32, cores + 4)

    def error(message: str, error_code: str, status: int, headers: dict[str, str]) -> Response:
        return Response(error_json(message, error_code), status_code=status, media_type="application/json",
                        headers=headers)

    def remaining(deadline: float) -> float:
        return max(deadline - time.monotonic(), 0.001)

    async def in_thread(deadline: float, slot: asyncio.Semaphore | None, body: bytes, content_type: str,
                        loaded: Any) -> Any:
        """MLflow's ``invocations`` in a worker thread, given up at ``deadline``: a call still queued then
        is cancelled and never starts (a running one cannot be stopped; the pixel budget bounds it).

        ``slot`` (held) is released when the thread's work ends or is cancelled, not when the request
        gives up: a decode that outlives its request keeps it, so heavy decodes never overlap.
        """
        screened = _Screened(loaded.model, heavy_pixels, holds_slot=slot is not None)
        try:
            future = pool.submit(invocations, body, content_type, screened, loaded.input_schema)
        except BaseException:
            if slot:
                slot.release()
            raise
        if slot:
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(slot.release))
        # wrap_future cancels the pool's future when the wait is cancelled: queued work never starts.
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=remaining(deadline))

    async def scored(deadline: float, *work: Any) -> Any:
        """The answer of ``invocations``; a heavy request first waits for the slot, holding no thread."""
        try:
            return await in_thread(deadline, None, *work)
        except _NeedsHeavySlot:
            pass
        async with asyncio.timeout(remaining(deadline)):  # not wait_for: on 3.11 it can lose an acquisition
            await heavy_slot.acquire()
        return await in_thread(deadline, heavy_slot, *work)

    @app.middleware("http")
    async def time_limit(request: Request, call_next: Any) -> Any:  # as MLflow's scoring server does
        try:
            return await asyncio.wait_for(call_next(request), timeout=timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return error(TIMEOUT_MESSAGE, "DEADLINE_EXCEEDED", 504, {})

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
        deadline = time.monotonic() + timeout
        loaded = follower.current  # taken once: a swap during this request does not change its model
        headers = {VERSION_HEADER: loaded.version}
        body = await _body(request, max_bytes)
        if body is None:
            return error(f"request body exceeds {max_bytes} bytes ({MAX_REQUEST_BYTES_ENV}); send smaller batches",
                         "REQUEST_LIMIT_EXCEEDED", 413, headers)
        try:
            answer = await scored(deadline, body, request.headers.get("content-type") or "", loaded)
        except (asyncio.TimeoutError, TimeoutError):
            return error(TIMEOUT_MESSAGE, "DEADLINE_EXCEEDED", 504, headers)
        except RecursionError:  # json.loads of a deeply nested body; MLflow lets it through (HTTP 500)
            return error("the request body is nested too deeply to parse", "INVALID_PARAMETER_VALUE", 400, headers)
        except MlflowException as refused:  # MLflow's own mapping: a bad image is INVALID_PARAMETER_VALUE, HTTP 400
            message = getattr(refused, "_pneumo_refusal", None) or scrubbed(refused.message)
            return error(message, refused.error_code, refused.get_http_status_code(), headers)
        except Exception as failed:  # a fault of ours: no stack trace or payload to the client
            log(f"scoring failed: {type(failed).__name__}: {scrubbed(str(failed))}")
            return error("internal error while scoring (see the server log)", "INTERNAL_ERROR", 500, headers)
        if answer.status != 200:  # MLflow's 415s: plain text naming the client's content type
            return error(scrubbed(str(answer.response)), "BAD_REQUEST", answer.status, headers)
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


async def _body(request: Any, max_bytes: int) -> bytes | None:
    """The request body, or None as soon as it (or its declared length) exceeds ``max_bytes``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        return None
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            return None
        parts.append(part)
    return b"".join(parts)


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
