"""The OpenAI-compatible HTTP app: `create_app(engine, model, model_name, api_key) -> FastAPI`.

Endpoints
  GET  /v1/models, GET /v1/models/{id}     the one served model (owned_by "dgemma"); 404 for other ids
  POST /v1/completions                     `prompt`: a string or a list of token ids
  POST /v1/chat/completions                `messages`, rendered with the checkpoint's chat template
  GET  /health                             200 {"status": "ok"}; 503 {"status": "draining"} during shutdown
  GET  /metrics                            Prometheus text format (see dgemma.server.metrics)

With an api_key, every /v1/* route needs `Authorization: Bearer <key>` (401 otherwise); /health and /metrics stay
open (metrics carry no request content; put them behind your proxy if that matters).

Streaming (`"stream": true`) sends server-sent events `data: {chunk}\\n\\n` and ends with `data: [DONE]\\n\\n`.
DiffusionGemma commits text one canvas (L tokens) at a time, so there is one content chunk per committed canvas
(canvases whose text is held back, e.g. a possible stop-string prefix, send none), then a chunk with an empty
delta / text and the finish_reason ("stop" or "length"), then, with `stream_options: {"include_usage": true}`, a
chunk with `"choices": []` and `usage`. If the engine aborts the request (shutdown drain timeout), the last chunk
has `"finish_reason": null` and an `"error": {"message", "type", "param", "code"}` object (the openai client raises
an APIError for it); `data: [DONE]` still follows.

Drafts extension (`"stream_drafts": true`, an extra body field; streaming only). Besides the normal chunks, each
denoising step sends a chunk whose choice carries no text (`"delta": {}` for chat, `"text": ""` for completions)
and an extra field `draft`:

    data: {"id": "chatcmpl-…", "object": "chat.completion.chunk", ..., "choices": [{"index": 0, "delta": {},
           "logprobs": null, "finish_reason": null, "draft": {"text": "<the step's argmax canvas, decoded>",
           "step": 3, "canvas": 0}}]}

`draft.text` is the whole current canvas (not a delta: each draft replaces the previous one), `step` counts the
denoising steps of this canvas from 1, `canvas` is the 0-based canvas index. The committed text still arrives in
the normal content chunks; clients that do not know the extension see empty deltas and ignore them.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.types import EngineStopped, QueueFull, RequestOutput, RequestRefused, SamplingParams
from ..errors import DGemmaError, UnsupportedInputError
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import (ApiError, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatMessage, CompletionChoice, CompletionChunk,
                       CompletionChunkChoice, CompletionRequest, CompletionResponse, DeltaMessage, Draft, ErrorInfo,
                       ModelCard, ModelList, Usage, bad_request, check_json_tree, chunk_json, parse_request,
                       too_deep)

log = logging.getLogger("dgemma.server")

QUEUE_FULL_RETRY_AFTER = "1"
STOPPED_RETRY_AFTER = "5"
DISCONNECT_POLL_S = 0.25
MAX_BODY_BYTES = 8 * 1024 * 1024  # 413 above it, before parsing (a 256k-token prompt as JSON ids is ~2 MiB)
SYSTEM_FINGERPRINT = f"dgemma-{__version__}"
_END = object()  # end of a run's event queue


class _ClientGone(Exception):
    """The HTTP client disconnected."""


# ==========================================================================================================
# per-app state
# ==========================================================================================================
class ServerState:
    """What the routes share: the engine, the model, the served name, metrics, and the drain state."""

    def __init__(self, engine: Any, model: Any, model_name: str, api_key: str | None, metrics: ServerMetrics,
                 drain_timeout: float):
        self.engine, self.model, self.model_name, self.api_key = engine, model, model_name, api_key
        self.metrics, self.drain_timeout = metrics, drain_timeout
        self.created = int(time.time())
        self.context_length = int(model.config.text.max_position_embeddings)
        self.vocab_size = int(model.config.text.vocab_size)
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.draining = False
        self.runs: set[_Run] = set()
        self._drain_task: asyncio.Task | None = None

    async def drain(self) -> None:
        """Stop taking requests, let the engine finish (or abort after drain_timeout) the running ones, and wait
        until their HTTP responses have their final events. Idempotent; concurrent callers share one drain."""
        self.draining = True
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drain_task)

    async def _drain(self) -> None:
        n = len(self.runs)
        log.info("draining: %d request%s in flight, timeout %.0fs", n, "" if n == 1 else "s", self.drain_timeout)
        try:
            await self.engine.shutdown(drain_timeout=self.drain_timeout)
        except Exception:
            log.exception("engine.shutdown failed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0  # the engine has ended every request; let the responses see their last event
        while self.runs and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for run in list(self.runs):  # should not happen: the engine left a request unfinished
            run.close()
        log.info("drained")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def tokenizer(self) -> Any:
        try:
            return self.model.tokenizer
        except DGemmaError as e:
            raise bad_request(f"{e} (this server cannot tokenize text)", "prompt", "no_tokenizer") from None

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        p = req.prompt_value()
        if isinstance(p, str):
            if not p:  # as for an empty token list (the tokenizer would give the start token alone)
                bos = getattr(self.model.generation_config, "bos_token_id", None)
                hint = (f"; to generate from the start token alone, send it as a token list: [{bos}]"
                        if isinstance(bos, int) else "")
                raise bad_request(f"prompt is an empty string; expected at least one character{hint}", "prompt")
            ids = self.tokenizer().encode(p)
            if not ids:
                raise bad_request("prompt is empty; expected at least one token", "prompt")
            return ids
        bad = [t for t in p if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"prompt contains token id {bad[0]} outside the vocabulary [0, {self.vocab_size})",
                              "prompt")
        if self.image_token_id is not None and self.image_token_id in p:
            raise ApiError(400, "prompt contains image tokens; dgemma serves a text-only model", param="prompt",
                           code="unsupported_value")
        return p

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        conversation = req.conversation()
        tok = self.tokenizer()
        try:
            return list(tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True))
        except UnsupportedInputError as e:
            raise ApiError(400, str(e), param="messages", code="unsupported_value") from None
        except DGemmaError as e:  # ChatTemplateError: no template, roles out of order, template error
            raise bad_request(str(e), "messages") from None


def _engine_error(e: BaseException, draining: bool) -> ApiError:
    """An exception from the engine as the HTTP error to answer."""
    if isinstance(e, RequestRefused):
        return ApiError(400, e.message, param=e.param, code=e.code or "invalid_value")
    if isinstance(e, QueueFull):
        return ApiError(429, f"the server is busy: its request queue is full ({e}); retry after a moment",
                        code="queue_full", headers={"Retry-After": QUEUE_FULL_RETRY_AFTER})
    if isinstance(e, EngineStopped):
        return _stopped_error()
    if isinstance(e, DGemmaError):
        return ApiError(400, str(e), code="invalid_value")
    log.error("engine error: %s: %s", type(e).__name__, e, exc_info=e)
    return ApiError(500, f"internal engine error ({type(e).__name__}); see the server log", code="engine_error")


def _stopped_error() -> ApiError:
    return ApiError(503, "the server is shutting down and accepts no new requests; retry on another instance or "
                         "after the restart", code="server_shutting_down",
                    headers={"Retry-After": STOPPED_RETRY_AFTER})


def _abort_error(draining: bool) -> ApiError:
    why = ("the server is shutting down and its drain timeout ran out" if draining
           else "the engine aborted it")
    return ApiError(503, f"the request was aborted before it finished: {why}; retry it", code="request_aborted",
                    headers={"Retry-After": STOPPED_RETRY_AFTER})


# ==========================================================================================================
# one request's engine stream
# ==========================================================================================================
class _Run:
    """Consumes `engine.generate` in its own task and hands events over a queue, so the HTTP side can watch for
    client disconnects while it waits, and cancel (which closes the engine generator, freeing the slot)."""

    def __init__(self, st: ServerState, prompt_ids: list[int], params: SamplingParams, rid: str):
        self.st, self.prompt_ids, self.params, self.rid = st, prompt_ids, params, rid
        self.q: asyncio.Queue = asyncio.Queue()
        self.t0 = time.perf_counter()
        self.last: RequestOutput | None = None
        self.outcome: str | None = None
        st.runs.add(self)
        self.task = asyncio.create_task(self._produce(), name=f"dgemma-{rid}")

    async def _produce(self) -> None:
        gen = None
        try:
            gen = self.st.engine.generate(self.prompt_ids, self.params, self.rid)
            if inspect.isawaitable(gen):
                gen = await gen
            async for out in gen:
                self.last = out
                self.q.put_nowait(out)
                if out.kind == "finished":
                    self.outcome = out.finish_reason or "stop"
                    break
            else:
                if self.outcome is None:
                    self.outcome = "error"
                    self.q.put_nowait(RuntimeError("the engine ended the request without a finished event"))
        except asyncio.CancelledError:
            self.outcome = self.outcome or "cancelled"
            raise
        except Exception as e:
            self.outcome = "refused" if self.last is None else "error"
            self.q.put_nowait(e)
        finally:
            try:
                if gen is not None and hasattr(gen, "aclose"):
                    await gen.aclose()
            except Exception:
                log.exception("%s: closing the engine stream failed", self.rid)
            finally:
                self.q.put_nowait(_END)
                self.st.runs.discard(self)
                self._log()

    def _log(self) -> None:
        if self.outcome == "refused":
            return  # answered as an HTTP error and counted there
        o = self.last
        ms = (time.perf_counter() - self.t0) * 1000
        log.info("%s finished: prompt_tokens=%d completion_tokens=%d canvases=%d steps=%d latency_ms=%.0f "
                 "finish_reason=%s", self.rid, o.prompt_tokens if o else len(self.prompt_ids),
                 o.completion_tokens if o else 0, o.canvases if o else 0, o.denoising_steps if o else 0, ms,
                 self.outcome if self.outcome != "cancelled" else "cancelled (client disconnected)")

    async def next(self, request: Request) -> Any:
        """The next event (a RequestOutput, an engine exception, or _END); _ClientGone if the client left."""
        while True:
            try:
                return await asyncio.wait_for(self.q.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone() from None

    def close(self) -> None:
        """Cancel the consumer task if it still runs (synchronous: safe inside a cancelled scope)."""
        if not self.task.done():
            self.task.cancel()


# ==========================================================================================================
# the app
# ==========================================================================================================
def create_app(engine: Any, model: Any, model_name: str, api_key: str | None = None, *,
               metrics: ServerMetrics | None = None, drain_timeout: float = 30.0,
               start_engine: bool = True) -> FastAPI:
    """The FastAPI app serving `model` through `engine` (a dgemma.engine.AsyncEngine).

    The app's lifespan starts the engine (`engine.start()`, unless start_engine=False) and drains it on shutdown
    (`engine.shutdown(drain_timeout)`). `metrics`: the ServerMetrics the engine was built with as its observer
    (`AsyncEngine(model, observer=metrics)`); without it the app makes its own, and installs it as the engine's
    observer when the engine has an empty `observer` attribute."""
    if metrics is None:
        existing = getattr(engine, "observer", None)
        metrics = existing if isinstance(existing, ServerMetrics) else ServerMetrics()
        if existing is None and hasattr(engine, "observer"):
            try:
                engine.observer = metrics
            except Exception:
                pass
    st = ServerState(engine, model, model_name, api_key, metrics, drain_timeout)
    metrics.bind_engine(engine.stats, lambda: st.draining)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            await st.drain()

    app = FastAPI(title="dgemma", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.dgemma = st
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key, metrics=metrics)

    # ---- errors ----------------------------------------------------------------------------------------------
    def error_response(err: ApiError) -> JSONResponse:
        if err.status >= 400:
            metrics.count_rejected(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        method, path = request.method, request.url.path
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            err = ApiError(404, f"Unknown route: {method} {path}. This server serves GET /v1/models, "
                                "POST /v1/completions, POST /v1/chat/completions, GET /health and GET /metrics",
                           type="invalid_request_error", code="unknown_url", headers=headers)
        elif exc.status_code == 405:
            allowed = headers.get("Allow") or headers.get("allow")
            err = ApiError(405, f"Method {method} is not allowed for {path}" + (f"; use {allowed}" if allowed else ""),
                           code="method_not_allowed", headers=headers)
        else:
            err = ApiError(exc.status_code, str(exc.detail), headers=headers)
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        where = ".".join(str(x) for x in errs[0].get("loc", ())[1:]) if errs else ""
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return error_response(bad_request(f"Invalid value for '{where or 'request'}': {msg}", where or None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc,
                  exc_info=exc)
        return error_response(ApiError(500, f"internal server error ({type(exc).__name__}); see the server log",
                                       code="internal_error"))

    # ---- routes ----------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if st.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": STOPPED_RETRY_AFTER})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> ModelCard:
        return ModelCard(id=st.model_name, created=st.created, max_model_len=st.context_length)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        st.check_model(model_id)
        return JSONResponse(model_card().model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(st, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(st, request, chat=True)

    return app


# ==========================================================================================================
# generation
# ==========================================================================================================
async def _read_json(request: Request) -> Any:
    """The request body as decoded JSON, whatever its Content-Type (as OpenAI's API, which accepts text/plain).
    413 above MAX_BODY_BYTES (by Content-Length, else counted while reading a chunked body); 400 for an empty
    body, invalid JSON, numbers beyond float range, NaN/Infinity, nesting deeper than MAX_JSON_DEPTH and strings
    that are not valid Unicode (lone surrogates)."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_BODY_BYTES:
        raise _too_large(f"{int(length):,} bytes")
    size, parts = 0, []
    async for part in request.stream():  # bounded even without a Content-Length (chunked uploads)
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise _too_large(f"more than {MAX_BODY_BYTES:,} bytes")
        parts.append(part)
    body = b"".join(parts)
    if not body.strip():
        raise bad_request("the request body is empty; expected a JSON object", None, "invalid_json")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    def finite(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise ValueError(f"the number {text[:40]} is beyond the range of a 64-bit float")
        return v

    try:
        value = json.loads(body, parse_constant=no_constants, parse_float=finite)
    except RecursionError:
        raise too_deep() from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}); expected a JSON object",
                          None, "invalid_json") from None
    check_json_tree(value)
    return value


def _too_large(size: str) -> ApiError:
    return ApiError(413, f"the request body is too large ({size}); at most {MAX_BODY_BYTES:,} bytes "
                         f"({MAX_BODY_BYTES / 2**20:g} MiB) are accepted", code="body_too_large")


async def _generate(st: ServerState, request: Request, chat: bool) -> Response:
    if st.draining:
        raise _stopped_error()
    body = await _read_json(request)
    req = parse_request(ChatCompletionRequest if chat else CompletionRequest, body)
    st.check_model(req.model)
    req.validate_values(st.context_length)
    prompt_ids = st.chat_prompt(req) if chat else st.completion_prompt(req)
    params = req.sampling_params()
    try:
        st.engine.validate(prompt_ids, params)
    except (RequestRefused, DGemmaError) as e:
        raise _engine_error(e, st.draining) from None
    if st.draining:
        raise _stopped_error()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    model_name = st.model_name
    run = _Run(st, prompt_ids, params, rid)
    try:
        # generate() refuses (queue full, stopped, ...) before its first event: wait for that before answering.
        first = await run.next(request)
    except _ClientGone:
        run.close()
        return Response(status_code=499)
    except BaseException:
        run.close()
        raise
    if first is _END:
        run.close()
        raise ApiError(500, "the engine ended the request without output; see the server log", code="engine_error")
    if isinstance(first, BaseException):
        run.close()
        raise _engine_error(first, st.draining)

    if req.stream:
        return _RunStreamingResponse(
            run, _sse(st, request, run, first, chat, rid, created, model_name, req.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- non-streaming: collect ----------------------------------------------------------------------------
    parts: list[str] = []
    item = first
    try:
        while True:
            if item is _END:
                raise ApiError(500, "the engine ended the request without a final event; see the server log",
                               code="engine_error")
            if isinstance(item, BaseException):
                raise _engine_error(item, st.draining)
            if item.kind == "canvas":
                parts.append(item.text)
            elif item.kind == "finished":
                parts.append(item.text)
                break
            item = await run.next(request)
    except _ClientGone:
        return Response(status_code=499)
    finally:
        run.close()
    fin: RequestOutput = item
    if fin.finish_reason not in ("stop", "length"):
        raise _abort_error(st.draining)
    text = "".join(parts)
    usage = Usage.of(fin.prompt_tokens, fin.completion_tokens)
    if chat:
        resp = ChatCompletionResponse(id=rid, created=created, model=model_name, system_fingerprint=SYSTEM_FINGERPRINT,
                                      choices=[ChatChoice(message=ChatMessage(content=text),
                                                          finish_reason=fin.finish_reason)], usage=usage)
    else:
        resp = CompletionResponse(id=rid, created=created, model=model_name, system_fingerprint=SYSTEM_FINGERPRINT,
                                  choices=[CompletionChoice(text=text, finish_reason=fin.finish_reason)], usage=usage)
    return JSONResponse(resp.model_dump())


async def _sse(st: ServerState, request: Request, run: _Run, first: Any, chat: bool, rid: str, created: int,
               model_name: str, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body. Closing (client gone, cancellation) cancels the run, which closes the engine generator."""

    def chunk(text: str | None = None, finish: str | None = None, draft: Draft | None = None,
              role: bool = False, error: ApiError | None = None, usage: Usage | None = None,
              no_choice: bool = False) -> str:
        err = ErrorInfo(message=error.message, type=error.type, param=error.param, code=error.code) if error else None
        if chat:
            choices = [] if no_choice else [ChatChunkChoice(
                delta=DeltaMessage(role="assistant" if role else None, content=text), finish_reason=finish,
                draft=draft)]
            c: Any = ChatCompletionChunk(id=rid, created=created, model=model_name,
                                         system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, usage=usage,
                                         error=err)
        else:
            choices = [] if no_choice else [CompletionChunkChoice(text=text or "", finish_reason=finish, draft=draft)]
            c = CompletionChunk(id=rid, created=created, model=model_name, system_fingerprint=SYSTEM_FINGERPRINT,
                                choices=choices, usage=usage, error=err)
        return f"data: {chunk_json(c)}\n\n"

    item = first
    try:
        if chat:
            yield chunk(text="", role=True)
        while True:
            if item is _END:
                item = RuntimeError("the engine ended the request without a final event")
            if isinstance(item, BaseException):
                yield chunk(error=_engine_error(item, st.draining))
                break
            if item.kind == "draft":
                if item.draft_text is not None:
                    yield chunk(text=None, draft=Draft(text=item.draft_text, step=item.step or 0,
                                                       canvas=item.canvas_index))
            elif item.kind == "canvas":
                if item.text:
                    yield chunk(text=item.text)
            elif item.kind == "finished":
                if item.text:
                    yield chunk(text=item.text)
                if item.finish_reason in ("stop", "length"):
                    yield chunk(text=None if chat else "", finish=item.finish_reason)
                    if include_usage:
                        yield chunk(usage=Usage.of(item.prompt_tokens, item.completion_tokens), no_choice=True)
                else:
                    yield chunk(error=_abort_error(st.draining))
                break
            if await request.is_disconnected():
                return
            item = await run.next(request)
        yield "data: [DONE]\n\n"
    except _ClientGone:
        return
    finally:
        run.close()


class _RunStreamingResponse(StreamingResponse):
    """Closes the run however the response ends, even if its body iterator never started (client gone early)."""

    def __init__(self, run: _Run, content: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.close()


class _AuthMiddleware:
    """Pure ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>` (401 in OpenAI's error shape)."""

    def __init__(self, app: Any, api_key: str, metrics: ServerMetrics):
        self.app, self.key, self.metrics = app, api_key.encode(), metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            if path == "/v1" or path.startswith("/v1/"):
                auth = b""
                for k, v in scope.get("headers", []):
                    if k == b"authorization":
                        auth = v
                        break
                scheme, _, token = auth.partition(b" ")
                if not auth:
                    msg = "Missing API key: send it as 'Authorization: Bearer <key>'"
                elif scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                    msg = "Incorrect API key provided"
                else:
                    msg = None
                if msg is not None:
                    self.metrics.count_rejected(401)
                    err = ApiError(401, msg, code="invalid_api_key",
                                   headers={"WWW-Authenticate": 'Bearer realm="dgemma"'})
                    await JSONResponse(err.body(), status_code=401, headers=err.headers)(scope, receive, send)
                    return
        await self.app(scope, receive, send)
