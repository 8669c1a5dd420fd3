"""Text tokenizer and chat template for dgemma.

`Tokenizer` wraps a HuggingFace `tokenizers` tokenizer loaded from a checkpoint directory
(`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) and renders chat conversations with the
checkpoint's jinja chat template in a sandbox.

`build_tokenizer` makes a small, self-contained, deterministic byte-level BPE tokenizer with Gemma's special-token
id layout, for randomly initialised test / demo / benchmark checkpoints. It never touches the network.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dgemma.errors import CheckpointError, DGemmaError, UnsupportedInputError

__all__ = [
    "Tokenizer",
    "ChatTemplateError",
    "build_tokenizer",
    "PAD_ID",
    "EOS_ID",
    "BOS_ID",
    "UNK_ID",
    "MASK_ID",
    "START_OF_TURN_ID",
    "END_OF_TURN_ID",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Content-part types that carry non-text media; dgemma is text-only.
_MEDIA_PART_TYPES = frozenset(
    {"image", "image_url", "input_image", "video", "video_url", "audio", "audio_url", "input_audio"}
)


class ChatTemplateError(DGemmaError):
    """A chat conversation that cannot be rendered: bad message shape, no template, or a template error."""


class _TemplateRaised(Exception):
    """Raised by the `raise_exception` global inside a chat template."""


def _token_content(value: Any, key: str, source: str) -> str | None:
    """Reads a special-token entry of tokenizer_config.json: a string, {"content": ...} dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(
        f"{source}: '{key}' must be a string, a {{\"content\": ...}} object or null, got {value!r}"
    )


class Tokenizer:
    """A text tokenizer: encode/decode, special-token ids, and chat-template rendering."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        source: str = "tokenizer",
    ) -> None:
        self._tk = backend
        self._json_text: str | None = None  # original tokenizer.json text when loaded from disk (saved verbatim)
        self._compiled_template: jinja2.Template | None = None
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._extra_config = dict(extra_config or {})

        vocab = backend.get_vocab(with_added_tokens=True)
        # ids may in principle have gaps, so the size is one past the largest id.
        self.vocab_size: int = (max(vocab.values()) + 1) if vocab else 0

        def lookup(key: str, token: str | None) -> int | None:
            if token is None:
                return None
            tid = backend.token_to_id(token)
            if tid is None:
                raise CheckpointError(f"{source}: {key} {token!r} is not in the tokenizer's vocabulary")
            return tid

        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id: int | None = lookup("bos_token", bos_token)
        self.eos_token_id: int | None = lookup("eos_token", eos_token)
        self.pad_token_id: int | None = lookup("pad_token", pad_token)
        self.unk_token_id: int | None = lookup("unk_token", unk_token)
        self.add_bos_token: bool = (self.bos_token_id is not None) if add_bos_token is None else bool(add_bos_token)
        if self.add_bos_token and self.bos_token_id is None:
            raise CheckpointError(f"{source}: add_bos_token is true but no bos_token is defined")

    @property
    def chat_template(self) -> str | None:
        """The jinja chat template source, or None."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self._chat_template = value
        self._compiled_template = None  # recompiled on next use

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Loads the tokenizer of an HF-format checkpoint directory."""
        d = Path(path)
        if not d.is_dir():
            raise CheckpointError(f"{d}: not a directory; expected a checkpoint directory containing {TOKENIZER_FILE}")

        tok_path = d / TOKENIZER_FILE
        if not tok_path.is_file():
            raise CheckpointError(
                f"{tok_path}: missing; expected a HuggingFace `tokenizers` tokenizer.json in the checkpoint directory"
            )
        json_text = _read_text(tok_path, "a HuggingFace `tokenizers` tokenizer.json")
        try:
            json.loads(json_text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{tok_path}: invalid JSON ({e}); expected a HuggingFace tokenizer.json") from e
        try:
            backend = _HFTokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a plain Exception for schema errors
            raise CheckpointError(
                f"{tok_path}: not a valid HuggingFace tokenizer.json ({e}); expected the format written by "
                "the `tokenizers` library"
            ) from e

        # tokenizer_config.json is optional.
        cfg: dict[str, Any] = {}
        cfg_path = d / TOKENIZER_CONFIG_FILE
        if cfg_path.is_file():
            cfg_text = _read_text(cfg_path, "a JSON object of tokenizer settings")
            try:
                cfg = json.loads(cfg_text)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: invalid JSON ({e}); expected a JSON object") from e
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
        src = str(cfg_path)

        def special(key: str, default: str) -> str | None:
            if key in cfg:
                return _token_content(cfg[key], key, src)
            # No config entry: fall back to the Gemma spelling if the vocabulary has it.
            return default if backend.token_to_id(default) is not None else None

        add_bos = cfg.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise CheckpointError(f"{src}: 'add_bos_token' must be true or false, got {add_bos!r}")
        max_len = cfg.get("model_max_length")
        if max_len is not None and not isinstance(max_len, int):
            max_len = None  # HF sometimes writes floats like 1e30 here; treat as unknown

        template = _config_chat_template(cfg.get("chat_template"), src)
        tmpl_path = d / CHAT_TEMPLATE_FILE
        if tmpl_path.is_file():  # chat_template.jinja wins over tokenizer_config.json
            template = _read_text(tmpl_path, "a jinja chat template")

        extra = {k: v for k, v in cfg.items() if k != "chat_template"}
        tok = cls(
            backend,
            bos_token=special("bos_token", "<bos>"),
            eos_token=special("eos_token", "<eos>"),
            pad_token=special("pad_token", "<pad>"),
            unk_token=special("unk_token", "<unk>"),
            add_bos_token=add_bos,
            chat_template=template,
            model_max_length=max_len,
            extra_config=extra,
            source=src if cfg else str(tok_path),
        )
        tok._json_text = json_text
        return tok

    def save(self, out_dir: str | Path) -> None:
        """Writes tokenizer.json, tokenizer_config.json and (if there is a template) chat_template.jinja."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        text = self._json_text if self._json_text is not None else self._tk.to_str()
        (d / TOKENIZER_FILE).write_text(text, encoding="utf-8")

        cfg = dict(self._extra_config)
        cfg.update(
            {
                "tokenizer_class": cfg.get("tokenizer_class", "PreTrainedTokenizerFast"),
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "pad_token": self.pad_token,
                "unk_token": self.unk_token,
                "add_bos_token": self.add_bos_token,
                "add_eos_token": cfg.get("add_eos_token", False),
                "clean_up_tokenization_spaces": cfg.get("clean_up_tokenization_spaces", False),
            }
        )
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

        tmpl_path = d / CHAT_TEMPLATE_FILE
        if self.chat_template is not None:
            tmpl_path.write_text(self.chat_template, encoding="utf-8")
        elif tmpl_path.exists():
            tmpl_path.unlink()  # do not leave a stale template from an earlier save next to our files

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; prepends BOS when add_special_tokens and add_bos_token (never a second BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        # The backend's own post-processor is bypassed so that BOS handling is the same for every checkpoint.
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:  # text that starts with "<bos>" already has it
                ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of each text, computed in parallel by the backend (large training sets load many times faster)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() expects strs, got {type(t).__name__}")
        out = [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            bos = self.bos_token_id
            out = [ids if ids and ids[0] == bos else [bos, *ids] for ids in out]
        return out

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list of ints or a 1-D tensor/array). Ids outside the vocabulary are skipped."""
        if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
            if getattr(ids, "ndim", 1) != 1:
                raise ValueError(f"decode() expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, Sequence):
            ids = list(ids)
        clean: list[int] = []
        for raw in ids:
            try:
                i = operator.index(raw)  # accepts Python and numpy integers
            except TypeError:
                raise TypeError(f"decode() expects integer ids, got {raw!r}") from None
            if 0 <= i < self.vocab_size:
                clean.append(i)
        return self._tk.decode(clean, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, s: str) -> int | None:
        """Id of token string `s`, or None if it is not in the vocabulary."""
        return self._tk.token_to_id(s)

    def id_to_token(self, i: int) -> str | None:
        """Token string of id `i`, or None if the id is not in the vocabulary."""
        if not 0 <= i < self.vocab_size:
            return None
        return self._tk.id_to_token(i)

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Renders a conversation with the chat template; returns token ids (tokenize=True) or the string."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template: expected chat_template.jinja or a 'chat_template' entry in "
                "tokenizer_config.json in the checkpoint directory"
            )
        msgs = _validate_messages(messages)
        template = self._template()
        try:
            text = template.render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
            )
        except _TemplateRaised as e:
            raise ChatTemplateError(f"the chat template rejected the conversation: {e}") from e
        except Exception as e:  # jinja2.TemplateError, SecurityError, TypeError from template code, ...
            raise ChatTemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from e
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)  # the template emits <bos> itself

    def _template(self) -> jinja2.Template:
        """The compiled chat template (compiled once, in a sandbox)."""
        if self._compiled_template is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )

            def raise_exception(message: Any) -> None:
                raise _TemplateRaised(str(message))

            def tojson(value: Any, indent: int | None = None) -> str:
                return json.dumps(value, ensure_ascii=False, indent=indent)

            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = tojson
            try:
                self._compiled_template = env.from_string(self.chat_template or "")
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"the chat template is not valid jinja (line {e.lineno}): {e.message}") from e
        return self._compiled_template

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
            f"pad={self.pad_token_id}, chat_template={'yes' if self.chat_template else 'no'})"
        )


def _read_text(path: Path, expected: str) -> str:
    """Reads a UTF-8 file, turning I/O and decoding errors into CheckpointError."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e}); expected {expected} in UTF-8") from e


def _config_chat_template(value: Any, source: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or HF's older list of {"name", "template"} entries."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, Mapping) and isinstance(t.get("template"), str) for t in value):
        named = {t.get("name"): t["template"] for t in value}
        if "default" in named:
            return named["default"]
        if value:
            return value[0]["template"]
        return None
    raise CheckpointError(f"{source}: 'chat_template' must be a string, got {type(value).__name__}")


def _validate_messages(messages: Any) -> list[dict]:
    """Checks that `messages` is a non-empty list of {"role": str, "content": str} dicts; returns copies."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}"
        )
    out: list[dict] = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(
                f"messages[{n}] must be a dict with 'role' and 'content', got {type(m).__name__}"
            )
        if "role" not in m or "content" not in m:
            missing = [k for k in ("role", "content") if k not in m]
            raise ChatTemplateError(f"messages[{n}] is missing {' and '.join(repr(k) for k in missing)}")
        if not isinstance(m["role"], str):
            raise ChatTemplateError(f"messages[{n}]['role'] must be a string, got {type(m['role']).__name__}")
        content = m["content"]
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in _MEDIA_PART_TYPES:
                    raise UnsupportedInputError(
                        f"messages[{n}] contains {part.get('type')!r} content; dgemma is text-only and does not "
                        "support images, audio or video"
                    )
        if not isinstance(content, str):
            raise ChatTemplateError(
                f"messages[{n}]['content'] must be a string, got {type(content).__name__}"
            )
        out.append(dict(m))
    return out


# ====================================================================== built-in test tokenizer

# Gemma's special-token id layout (ids 0-4 and 105/106 as in Gemma's vocabulary).
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106
_NAMED_SPECIALS = {
    PAD_ID: "<pad>",
    EOS_ID: "<eos>",
    BOS_ID: "<bos>",
    UNK_ID: "<unk>",
    MASK_ID: "<mask>",
    START_OF_TURN_ID: "<start_of_turn>",
    END_OF_TURN_ID: "<end_of_turn>",
}
_NUM_LOW_SPECIALS = 256  # ids [0, 256) are special tokens; unnamed ones are "<unused{id}>"
_NUM_BYTES = 256  # ids [256, 512) are the byte-level alphabet
MIN_VOCAB_SIZE = _NUM_LOW_SPECIALS + _NUM_BYTES
_MAX_MERGES = 4096  # upper bound on trained merges; the corpus usually runs out of pairs first

DEFAULT_CHAT_TEMPLATE = """\
{#- Gemma-style turns. A leading system message is folded into the first user turn; "assistant" is "model". -#}
{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- set turns = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set ns.system = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
{%- endif -%}
{%- if not turns and ns.system -%}
    {{- '<start_of_turn>user\\n' + ns.system + '<end_of_turn>\\n' -}}
{%- endif -%}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {%- set speaker = 'user' -%}
    {%- elif message['role'] in ('assistant', 'model') -%}
        {%- set speaker = 'model' -%}
    {%- elif message['role'] == 'system' -%}
        {{- raise_exception('only the first message may have role "system"') -}}
    {%- else -%}
        {{- raise_exception('unknown role "' + message['role'] + '"; expected system, user or assistant') -}}
    {%- endif -%}
    {%- if (speaker == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('conversation roles must alternate user/assistant/user/... starting with user') -}}
    {%- endif -%}
    {%- set content = message['content'] -%}
    {%- if loop.first and ns.system -%}
        {%- set content = ns.system + '\\n\\n' + content -%}
    {%- endif -%}
    {{- '<start_of_turn>' + speaker + '\\n' + content + '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

# A small original English corpus for training BPE merges. Written for this project.
_CORPUS = """\
The morning fog lifted slowly from the harbour, and the fishing boats came back one by one. Each crew tied its \
lines to the old iron rings along the quay, counted the catch, and argued about the weather for tomorrow. Nobody \
agreed, which is how they knew it was an ordinary day.

In the small kitchen behind the bakery, Maria kneaded the dough for the second time. She said that bread is a \
patient teacher: if you hurry it, it will show you exactly where you were careless. The oven was already hot, \
and the whole street smelled of flour, butter and a little bit of smoke.

Learning to program is a lot like learning a new language. At first every sentence takes effort, and you check \
each word twice. Later you start to think in the language itself, and the rules fade into the background. The \
important thing is to keep writing small programs, to read other people's code, and to ask questions when you \
are stuck.

A train left the station at 7:45 and travelled north for three hours. The passengers read newspapers, looked at \
the fields and rivers, and talked quietly about their plans. When the train finally stopped, it was raining, \
but somebody had remembered to bring an umbrella, and they shared it all the way to the hotel.

Scientists measure the world carefully because small errors grow into large ones. A model that is right most of \
the time can still be wrong in the cases that matter. That is why good experiments are repeated, why results are \
compared with other results, and why honest reports describe what did not work as well as what did.

What time is it? It is twenty past nine. Where are you going? I am going to the library to return some books, \
and then I would like to walk in the park for a while before lunch. Would you like to come with me? Yes, thank \
you, that sounds like a very good idea.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character map used by byte-level BPE (same alphabet as tokenizers' ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)  # non-printable bytes move to unused code points above Latin-1
            shift += 1
    return dict(sorted(table.items()))


@lru_cache(maxsize=1)
def _trained_merges() -> tuple[tuple[str, str], ...]:
    """BPE merges learnt from _CORPUS, in priority order (trained once per process)."""
    trainee = _HFTokenizer(models.BPE())
    trainee.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_NUM_BYTES + _MAX_MERGES,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    trainee.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    merges = json.loads(trainee.to_str())["model"]["merges"]
    # Merges are serialised either as [a, b] pairs or as "a b" strings depending on the tokenizers version.
    return tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges)  # type: ignore[misc]


def build_tokenizer(vocab_size: int, *, model_max_length: int = 131072) -> Tokenizer:
    """A deterministic byte-level BPE tokenizer of exactly `vocab_size` ids with Gemma's special-token layout.

    Layout: [0, 256) special tokens (<pad> <eos> <bos> <unk> <mask>, 105 <start_of_turn>, 106 <end_of_turn>, the
    rest <unused{id}>); [256, 512) the 256 byte-level tokens; then BPE merges learnt from a small corpus; then
    plain <unused{id}> filler entries so every id decodes to something.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 special tokens + 256 byte tokens), got {vocab_size}"
        )

    vocab: dict[str, int] = {}
    specials = [_NAMED_SPECIALS.get(i, f"<unused{i}>") for i in range(_NUM_LOW_SPECIALS)]
    for tok in specials:
        vocab[tok] = len(vocab)
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)

    # Take trained merges in priority order while there is room. A merge whose result is already in the vocab
    # (two different pairs can spell the same string) costs no id.
    merges: list[tuple[str, str]] = []
    for a, b in _trained_merges():
        if a + b not in vocab:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
        merges.append((a, b))

    # Plain (non-added) filler entries: cheap even for 262144 ids, and every id decodes to its own name.
    for i in range(len(vocab), vocab_size):
        name = f"<unused{i}>"
        assert name not in vocab, name  # merged tokens are byte-level strings, never "<unused…>"
        vocab[name] = i

    backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Raw `tokenizers` / transformers users get <bos> prepended like Gemma; dgemma's encode() adds it itself.
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    backend.add_special_tokens(specials)  # already in the vocab, so they keep their ids

    return Tokenizer(
        backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
