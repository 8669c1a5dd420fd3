"""OpenAI-compatible request/response shapes for the dgemma HTTP server.

Requests are parsed tolerantly (unknown fields are ignored, as OpenAI clients send fields this server does not
know), but known fields are type-checked strictly and unsupported *values* of known fields are refused with a 400
that says what is unsupported (`n=2`, `top_p=0.9`, `logprobs`, image content parts, ...). Every failure is an
`ApiError`, rendered as OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.

DiffusionGemma-specific sampler settings travel as extra body fields (the `extra_body` of the openai client):
`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`, `confidence_threshold` and
`stream_drafts` (see `dgemma.server.app` for the drafts streaming extension).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.types import SamplingParams

MAX_STOP_STRINGS = 4
MAX_JSON_DEPTH = 64  # arrays and objects, the body itself counted; an OpenAI chat request needs 5
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range
# Content-part types that carry non-text media (dgemma serves a text-only model).
MEDIA_PART_TYPES = frozenset({"image", "image_url", "input_image", "video", "video_url", "audio", "audio_url",
                              "input_audio", "file", "input_file"})


# ==========================================================================================================
# errors
# ==========================================================================================================
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` JSON with an HTTP status (and optional headers)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or default_error_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def default_error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
            503: "service_unavailable_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unsupported(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_value")


# ==========================================================================================================
# requests
# ==========================================================================================================
class _Tolerant(BaseModel):
    """Unknown fields are accepted and ignored; known fields must have the right JSON type."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Tolerant):
    include_usage: bool | None = None


class _SamplingRequest(_Tolerant):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = None  # str | list[str] | None, checked in validate() for a clearer message
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    # DiffusionGemma sampler extras (extra_body)
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    stream_drafts: bool | None = False
    sampler: str | None = None

    def effective_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def validate_values(self, context_length: int) -> None:
        """Refuse unsupported or out-of-range values of known fields (ApiError 400)."""
        mt, mt_name = self.effective_max_tokens()
        if mt is not None:
            if mt < 1:
                raise bad_request(f"{mt_name} must be at least 1, got {mt}", mt_name)
            if mt > context_length:
                raise bad_request(f"{mt_name}={mt} exceeds the model's context of {context_length} tokens "
                                  "(prompt + max_tokens must fit)", mt_name, "context_length_exceeded")
        if self.temperature is not None and not (0.0 <= self.temperature <= 2.0 and math.isfinite(self.temperature)):
            raise bad_request(f"temperature must be between 0 and 2, got {self.temperature}", "temperature")
        if self.top_p is not None and self.top_p != 1:
            raise unsupported(f"top_p={self.top_p} is not supported: DiffusionGemma's entropy-bound sampler has no "
                              "nucleus sampling; omit top_p or send 1", "top_p")
        if self.n is not None and self.n != 1:
            raise unsupported(f"n={self.n} is not supported: dgemma returns one choice per request; omit n or send "
                              "1 (send several requests for several samples)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and v != 0:
                raise unsupported(f"{name}={v} is not supported by the diffusion sampler; omit it or send 0", name)
        if self.logit_bias:
            raise unsupported("logit_bias is not supported by the diffusion sampler; omit it", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise bad_request(f"seed={self.seed} is out of range; expected an integer in [-2**63, 2**64)", "seed")
        if self.sampler is not None and self.sampler not in ("fast", "reference"):
            raise bad_request(f"sampler={self.sampler!r} is invalid; expected 'fast' (the default) or 'reference'",
                              "sampler")
        self.stop_list()  # type-checks stop

    def stop_list(self) -> list[str]:
        s = self.stop
        if s is None:
            return []
        if isinstance(s, str):
            s = [s]
        elif not isinstance(s, list) or not all(isinstance(x, str) for x in s):
            raise bad_request(f"Invalid type for 'stop': expected a string or an array of up to {MAX_STOP_STRINGS} "
                              f"strings, got {json_type(s if not isinstance(s, list) else _first_bad(s))}", "stop",
                              "invalid_type")
        if len(s) > MAX_STOP_STRINGS:
            raise bad_request(f"stop has {len(s)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
        if any(x == "" for x in s):
            raise bad_request("stop strings must not be empty", "stop")
        return list(s)

    def sampling_params(self) -> SamplingParams:
        mt, _ = self.effective_max_tokens()
        return SamplingParams(
            max_tokens=mt, seed=self.seed, temperature=self.temperature,
            max_denoising_steps=self.max_denoising_steps, entropy_bound=self.entropy_bound, t_min=self.t_min,
            t_max=self.t_max, stability_threshold=self.stability_threshold,
            confidence_threshold=self.confidence_threshold, stop=self.stop_list(),
            stream_drafts=bool(self.stream_drafts and self.stream), sampler=self.sampler)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a one-element list of either."""

    prompt: Any = Field(...)
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def validate_values(self, context_length: int) -> None:
        super().validate_values(context_length)
        if self.echo:
            raise unsupported("echo=true is not supported; omit it or send false", "echo")
        if self.best_of is not None and self.best_of != 1:
            raise unsupported(f"best_of={self.best_of} is not supported; omit it or send 1", "best_of")
        if self.logprobs is not None:
            raise unsupported("logprobs are not supported by dgemma (a diffusion model has no per-token "
                              "left-to-right log-probabilities); omit logprobs or send null", "logprobs")
        if self.suffix:
            raise unsupported("suffix (insertion) is not supported; omit it", "suffix")

    def prompt_value(self) -> str | list[int]:
        """The prompt as one string or one list of token ids (ApiError 400 for batches and bad shapes)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if isinstance(p, list):
            if not p:
                raise bad_request("prompt is empty; expected a string or a non-empty list of token ids", "prompt")
            if all(_is_int(x) for x in p):
                return list(p)
            if len(p) == 1 and (isinstance(p[0], str) or (isinstance(p[0], list) and p[0]
                                                          and all(_is_int(x) for x in p[0]))):
                return p[0] if isinstance(p[0], str) else list(p[0])
            if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
                raise unsupported(f"batched prompts are not supported (got a list of {len(p)} prompts); send one "
                                  "prompt per request (a string or a list of token ids)", "prompt")
            raise bad_request("Invalid type for 'prompt': expected a string or a list of integer token ids, got a "
                              f"list containing {json_type(_first_bad(p))}", "prompt", "invalid_type")
        raise bad_request(f"Invalid type for 'prompt': expected a string or a list of integer token ids, got "
                          f"{json_type(p)}", "prompt", "invalid_type")


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Any = Field(...)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None

    def effective_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def validate_values(self, context_length: int) -> None:
        super().validate_values(context_length)
        if self.logprobs or self.top_logprobs:
            raise unsupported("logprobs are not supported by dgemma (a diffusion model has no per-token "
                              "left-to-right log-probabilities); omit logprobs/top_logprobs", "logprobs")
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            raise unsupported(f"{name} (function calling) is not supported by dgemma; omit {name}", name)
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice is not supported by dgemma (no tools); omit it", "tool_choice")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise unsupported(f"response_format type {self.response_format.get('type')!r} is not supported; only "
                              "{'type': 'text'}", "response_format")
        if self.audio is not None or (self.modalities is not None and set(self.modalities) - {"text"}):
            raise unsupported("audio output is not supported; dgemma generates text only", "modalities")

    def conversation(self) -> list[dict[str, str]]:
        """The messages as [{"role", "content": str}] for the chat template (ApiError 400 on bad shapes, media
        content parts, tool messages). "developer" becomes "system"; text content parts are joined with newlines."""
        msgs = self.messages
        if not isinstance(msgs, list):
            raise bad_request(f"Invalid type for 'messages': expected an array of message objects, got "
                              f"{json_type(msgs)}", "messages", "invalid_type")
        if not msgs:
            raise bad_request("messages must contain at least one message", "messages")
        out = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise bad_request(f"Invalid type for '{where}': expected an object, got {json_type(m)}", where,
                                  "invalid_type")
            role = m.get("role")
            if role is None:
                raise bad_request(f"Missing required parameter: '{where}.role'", f"{where}.role", "missing_required")
            if not isinstance(role, str):
                raise bad_request(f"Invalid type for '{where}.role': expected a string, got {json_type(role)}",
                                  f"{where}.role", "invalid_type")
            if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
                raise unsupported(f"{where}: tool and function messages are not supported by dgemma (no function "
                                  "calling)", where)
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise bad_request(f"Invalid value for '{where}.role': {role!r}; expected 'system', 'developer', "
                                  "'user' or 'assistant'", f"{where}.role")
            if "content" not in m:
                raise bad_request(f"Missing required parameter: '{where}.content'", f"{where}.content",
                                  "missing_required")
            content = m["content"]
            if content is None and role == "assistant":
                content = ""
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    pw = f"{where}.content[{j}]"
                    if isinstance(part, str):
                        texts.append(part)
                        continue
                    if not isinstance(part, dict):
                        raise bad_request(f"Invalid type for '{pw}': expected a content part object, got "
                                          f"{json_type(part)}", pw, "invalid_type")
                    ptype = part.get("type")
                    if ptype in MEDIA_PART_TYPES:
                        raise unsupported(f"{pw} has type {ptype!r}: image, audio, video and file inputs are not "
                                          "supported; dgemma serves a text-only model (send text content only)", pw)
                    if ptype != "text":
                        raise unsupported(f"{pw} has type {ptype!r}; only 'text' content parts are supported", pw)
                    if not isinstance(part.get("text"), str):
                        raise bad_request(f"Invalid type for '{pw}.text': expected a string, got "
                                          f"{json_type(part.get('text'))}", f"{pw}.text", "invalid_type")
                    texts.append(part["text"])
                content = "\n".join(texts)
            elif not isinstance(content, str):
                raise bad_request(f"Invalid type for '{where}.content': expected a string or an array of text "
                                  f"content parts, got {json_type(content)}", f"{where}.content", "invalid_type")
            out.append({"role": role, "content": content})
        return out


def check_json_tree(body: Any) -> None:
    """Refuse a decoded body nested deeper than MAX_JSON_DEPTH, or holding a string that is not valid Unicode: a
    lone UTF-16 surrogate such as "\\ud800", which a JSON escape can spell but no UTF-8 text holds (the tokenizer
    and the response encoder would fail on it). ApiError 400 naming the field. Iterative, so any depth is safe."""
    if not isinstance(body, (dict, list)):
        return
    stack: list[tuple[Any, int, tuple]] = [(body, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise too_deep()
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(key, str) and not _is_unicode(key):
                where = f"'{format_loc(path)}'" if path else "the body"
                raise bad_request(f"a key of {where} is not valid Unicode: {_surrogate_note(key)}",
                                  format_loc(path) if path else None, "invalid_encoding")
            if isinstance(value, str):
                if not _is_unicode(value):
                    loc = format_loc((*path, key))
                    raise bad_request(f"'{loc}' is not valid Unicode: {_surrogate_note(value)}", loc,
                                      "invalid_encoding")
            elif isinstance(value, (dict, list)):
                stack.append((value, depth + 1, (*path, key)))


def too_deep() -> ApiError:
    return bad_request(f"the request body is nested too deeply: at most {MAX_JSON_DEPTH} levels of arrays and "
                       "objects are accepted", None, "too_deep")


def _is_unicode(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _surrogate_note(s: str) -> str:
    i = next(i for i, ch in enumerate(s) if "\ud800" <= ch <= "\udfff")
    return (f"it contains a lone UTF-16 surrogate (\\u{ord(s[i]):04x} at character {i}); a surrogate escape must "
            "come as a high-low pair, e.g. \\ud83d\\ude00")


def parse_request(cls: type[_SamplingRequest], body: Any) -> _SamplingRequest:
    """Validate a decoded JSON body into `cls`; pydantic's error list becomes one clear ApiError 400."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {json_type(body)}", None, "invalid_type")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error_to_api(e) from None


def validation_error_to_api(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    loc = format_loc(err.get("loc", ()))
    etype = err.get("type", "")
    if etype == "missing":
        return bad_request(f"Missing required parameter: '{loc}'", loc, "missing_required")
    expected = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
                "float_type": "a number", "float_parsing": "a number", "bool_type": "a boolean",
                "bool_parsing": "a boolean", "string_type": "a string", "dict_type": "an object",
                "model_type": "an object", "model_attributes_type": "an object", "list_type": "an array"}.get(etype)
    if expected is not None:
        return bad_request(f"Invalid type for '{loc}': expected {expected}, but got {json_type(err.get('input'))} "
                           "instead", loc, "invalid_type")
    return bad_request(f"Invalid value for '{loc}': {err.get('msg', 'invalid')}", loc)


def format_loc(loc: tuple | list) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _first_bad(items: list) -> Any:
    for x in items:
        if not (isinstance(x, str) or _is_int(x)):
            return x
    return items[0] if items else None


# ==========================================================================================================
# responses
# ==========================================================================================================
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


FinishReason = Literal["stop", "length"]


class Draft(BaseModel):
    """The drafts streaming extension: one denoising step's argmax canvas (see dgemma.server.app)."""

    text: str
    step: int
    canvas: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dgemma"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None
    draft: Draft | None = None  # drafts extension only


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None
    draft: Draft | None = None  # drafts extension only


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    error: ErrorInfo | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    error: ErrorInfo | None = None


def chunk_json(chunk: BaseModel) -> str:
    """A chunk as compact JSON: `draft`, `error`, `usage` and an empty delta's role/content appear only when set."""
    d = chunk.model_dump()
    for key in ("usage", "error"):
        if d.get(key) is None:
            d.pop(key, None)
    for c in d.get("choices", []):
        if c.get("draft") is None:
            c.pop("draft", None)
        delta = c.get("delta")
        if delta is not None:
            for k in [k for k, v in delta.items() if v is None]:
                del delta[k]
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))
