"""The FastAPI application: routes, the API-key and request-size guard, and JSON errors.

``create_app(settings)`` builds it; :mod:`src.api.main` runs it under uvicorn. Every error
is JSON (``{"error": {"message", "type", "param", "code"}}``, the OpenAI shape) with a
4xx status for anything the client can fix, 503 for a model that is not trained (the
message names the command that trains it) or a full queue, and 500 only for a bug.
"""

from __future__ import annotations

import copy
import gc
import hmac
import json
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from src.api.generation import GenerationTimeoutError, PrefillError, ServerBusyError
from src.api.metrics import Metrics, MetricsMiddleware
from src.api.registry import LANGUAGE_MODELS, SERVED_MODELS
from src.api.schemas import EMBEDDING_DIM_MARK, EMBEDDING_MODEL_MARK, MAX_SEED, TOKEN_ID_MARK, embedding_model_ids
from src.api.service import ModelService, PromptTooLongError, ServerSettings
from src.core.errors import CheckpointError, MarkError, NotTrainedError
from src.api.errors import APIError, error_body, error_response
from src.core.logging import get_logger

log = get_logger("api")

# Paths anyone may call when an API key is set (liveness probes); they reveal no model data.
OPEN_PATHS = frozenset({"/health"})


# ------------------------------------------------------------------------------ guard
class _BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read (an HTTP exception, so FastAPI's body parser passes it on)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body over the limit of {max_bytes} bytes")


class RequestGuard:
    """ASGI middleware run before routing and body parsing: the API key (``Authorization:
    Bearer <key>`` or ``X-API-Key: <key>``; 401 without it) and the request-size limit (413)."""

    def __init__(self, app, api_key: str | None, max_bytes: int, own_guard_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_bytes = max_bytes
        # Mounted apps that check the key and sizes themselves (the Board: login page, upload limit).
        self.own_guard_prefixes = own_guard_prefixes

    async def _reject(self, send, status: int, message: str, type: str, headers: dict | None = None) -> None:
        body = json.dumps(error_body(status, message, type)).encode()
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        supplied = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if supplied is None and auth[:7].lower() == b"bearer ":
            supplied = auth[7:].strip()
        return supplied is not None and hmac.compare_digest(supplied, self.api_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.own_guard_prefixes):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS and not self._authorized(headers):
            return await self._reject(
                send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                "authentication_error", {"WWW-Authenticate": "Bearer"},
            )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send, 413, f"request body over the limit of {self.max_bytes} bytes", "request_too_large")

        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send, 413, f"request body over the limit of {self.max_bytes} bytes", "request_too_large")


# ------------------------------------------------------------------------------ errors
def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for item in err.errors():
        loc = [str(x) for x in item.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts[:5]) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        for item in err.errors():
            if item.get("type") == "json_invalid":
                reason = (item.get("ctx") or {}).get("error", "decode error")
                position = item.get("loc", ("body", "?"))[-1]
                return error_response(400, f"the body is not valid JSON: {reason} (character {position})", "invalid_request_error")
        message, param = _validation_message(err)
        return error_response(422, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        kind = "request_too_large" if err.status_code == 413 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), kind, headers=getattr(err, "headers", None))

    @app.exception_handler(NotTrainedError)
    async def _not_trained(request: Request, err: NotTrainedError):
        return error_response(503, str(err), "model_not_trained", headers={"Retry-After": "60"})

    @app.exception_handler(MarkError)
    async def _mark_error(request: Request, err: MarkError):
        if isinstance(err, CheckpointError):  # a damaged model file: the server cannot serve it
            return error_response(503, str(err), "model_unavailable")
        return error_response(400, str(err), "invalid_request_error")

    @app.exception_handler(ServerBusyError)
    async def _busy(request: Request, err: ServerBusyError):
        return error_response(503, str(err), "server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(GenerationTimeoutError)
    async def _timeout(request: Request, err: GenerationTimeoutError):
        return error_response(504, str(err), "timeout")

    @app.exception_handler(PrefillError)
    async def _prefill(request: Request, err: PrefillError):
        log.warning("%s %s: %s", request.method, request.url.path, err)
        return error_response(500, str(err), "internal_error")

    @app.exception_handler(PromptTooLongError)
    async def _too_long(request: Request, err: PromptTooLongError):
        return error_response(400, str(err), "invalid_request_error", "prompt")

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(err).__name__}", "internal_error")


# ------------------------------------------------------------------------------ app
def _warm_up(service: ModelService, state) -> None:
    """Load every trained model, start its worker and pass one small request through it, so
    first requests are not slow; ``state.ready`` (``/health``'s ``ready``) when done."""
    service.registry.preload(SERVED_MODELS)
    for name in SERVED_MODELS:
        if not service.registry.is_loaded(name):
            continue
        try:
            if name in LANGUAGE_MODELS:
                service.generator(name)
            elif name == "rag":
                service.embedder()
            elif name == "transformer":
                service.classifier()
        except MarkError as err:
            log.warning("%s worker not started: %s", name, err)
    try:
        seconds = service.warm_up()
        log.info("models ready: %s (warm-up %.1f s)", ", ".join(n for n in SERVED_MODELS if service.registry.is_loaded(n)) or "none", seconds)
    except Exception:  # a model that fails here fails its requests the same way, with the error
        log.exception("warm-up request failed")
    # The loaded models and indexes are millions of long-lived objects: out of the garbage
    # collector's sight, a full collection under load scans only what requests made (measured
    # on the demo models: full collections of 0.2-0.5 s, each a pause of every request).
    gc.freeze()
    state.ready = True


def _served_limits(service: ModelService) -> dict[str, int]:
    """The numbers of the loaded models that bound some request fields: the largest token id
    every loaded language model knows, and the embedding size."""
    limits: dict[str, int] = {}
    registry = service.registry
    vocab = [registry.get(n).tokenizer.vocab_size for n in LANGUAGE_MODELS if registry.is_loaded(n)]
    if vocab:
        limits[TOKEN_ID_MARK] = min(vocab) - 1
    if registry.is_loaded("rag"):
        encoder = registry.get("rag").model.index.encoder
        limits[EMBEDDING_DIM_MARK] = encoder.dim
        limits[EMBEDDING_MODEL_MARK] = embedding_model_ids(encoder.name)
    return limits


JSON_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _integer_bounds(node: dict) -> None:
    """Bounds of an integer node as exact JSON-Schema integers."""
    if node.get("type") != "integer":
        return
    # Bounds of an integer with a before-validator (src.api.schemas.Int) come out of
    # pydantic under their Python names; JSON Schema's are these.
    for python_name, json_name in JSON_BOUNDS.items():
        if python_name in node:
            node[json_name] = node.pop(python_name)
    # FastAPI's OpenAPI model writes bounds as floats; integers above 2**53 lose digits
    # (2**63 - 1 became 2**63), so integer bounds are written back as exact integers.
    for key in ("minimum", "maximum"):
        if isinstance(node.get(key), float):
            node[key] = MAX_SEED if node[key] >= MAX_SEED else int(node[key])


def _fill_limits(node, limits: dict[str, int]) -> None:
    """Exact integer bounds everywhere, and ``limits`` written into the schema nodes marked
    with their key (see src.api.schemas)."""
    if isinstance(node, dict):
        _integer_bounds(node)
        # A marked optional field (anyOf [type, null]) gets the limit on its non-null branch.
        targets = [b for b in node.get("anyOf", []) if b.get("type") not in (None, "null")] or [node]
        for target in targets:
            _integer_bounds(target)
            if TOKEN_ID_MARK in node and TOKEN_ID_MARK in limits:
                target["maximum"] = limits[TOKEN_ID_MARK]
            if EMBEDDING_MODEL_MARK in node and EMBEDDING_MODEL_MARK in limits:
                target["enum"] = limits[EMBEDDING_MODEL_MARK]
            if EMBEDDING_DIM_MARK in node and EMBEDDING_DIM_MARK in limits:
                target["minimum"] = target["maximum"] = limits[EMBEDDING_DIM_MARK]
        for value in node.values():
            _fill_limits(value, limits)
    elif isinstance(node, list):
        for value in node:
            _fill_limits(value, limits)


def install_openapi(app: FastAPI, service: ModelService) -> None:
    """``/openapi.json`` with the loaded models' limits filled in: token ids below the
    vocabulary size, embedding ``dimensions`` equal to the encoder's. Validation enforces
    the same numbers (400 naming the field), so the contract states what is accepted."""
    base_openapi = app.openapi

    def openapi() -> dict:
        schema = copy.deepcopy(base_openapi())  # FastAPI caches the base schema
        _fill_limits(schema, _served_limits(service))
        return schema

    app.openapi = openapi


def create_app(settings: ServerSettings | None = None, service: ModelService | None = None) -> FastAPI:
    """The API application over ``settings`` (checkpoints or export dir, key, limits)."""
    from src.api.routes import mark, openai_compat

    settings = settings or ServerSettings()
    service = service or ModelService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.preload:
            threading.Thread(target=_warm_up, args=(service, app.state), name="preload", daemon=True).start()
        yield
        service.close()

    app = FastAPI(
        title="MARK API",
        description="MARK's trained models over HTTP: retrieval, generation, classification, grounded answers, "
        "and OpenAI-compatible completions, chat and embeddings.",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.started = time.time()
    app.state.ready = not settings.preload  # with preload: once every model is loaded and warmed up
    app.state.metrics = Metrics(service)
    install_error_handlers(app)
    app.include_router(mark.router)
    app.include_router(openai_compat.router)
    install_openapi(app, service)
    board_prefixes: tuple[str, ...] = ()
    if settings.board:
        from src.board.app import BOARD_PATH, mount_board

        mount_board(app, service)  # shares this service's loaded models; asks for the same API key
        board_prefixes = (BOARD_PATH,)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_bytes=settings.max_request_bytes, own_guard_prefixes=board_prefixes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: counts 401s and 413s too
    return app
