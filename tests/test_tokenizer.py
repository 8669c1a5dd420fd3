"""Tests for dgemma.tokenizer: the built-in test tokenizer, checkpoint loading/saving and chat templates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dgemma.errors import CheckpointError, DGemmaError, UnsupportedInputError
from dgemma.tokenizer import (
    BOS_ID,
    END_OF_TURN_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    START_OF_TURN_ID,
    UNK_ID,
    ChatTemplateError,
    Tokenizer,
    build_tokenizer,
)

ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\ttabbed\r\nwindows line",
    "Ünïcödé — naïve café, 日本語のテキスト, русский, العربية",
    "emoji 🎉👍🏽 and family 👨‍👩‍👧 and flags 🇳🇿",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code",
    "<not a special token> <bos_> < bos>",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer(1024)


# ---------------------------------------------------------------- build_tokenizer


def test_rejects_small_vocab() -> None:
    with pytest.raises(ValueError, match="at least 512"):
        build_tokenizer(511)


def test_special_token_layout(tok: Tokenizer) -> None:
    expected = {
        "<pad>": PAD_ID,
        "<eos>": EOS_ID,
        "<bos>": BOS_ID,
        "<unk>": UNK_ID,
        "<mask>": MASK_ID,
        "<start_of_turn>": START_OF_TURN_ID,
        "<end_of_turn>": END_OF_TURN_ID,
    }
    assert expected == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
                        "<start_of_turn>": 105, "<end_of_turn>": 106}
    for s, i in expected.items():
        assert tok.token_to_id(s) == i
        assert tok.id_to_token(i) == s
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.id_to_token(5) == "<unused5>"
    assert tok.id_to_token(256) == "Ā" and tok.id_to_token(511) == "ÿ"  # byte-level alphabet at [256, 512)
    assert build_tokenizer(4096).id_to_token(4095) == "<unused4095>"  # filler after the merges
    assert tok.id_to_token(1024) is None and tok.id_to_token(-1) is None
    assert tok.token_to_id("definitely-not-a-token") is None
    # Special tokens in text are matched as single ids.
    assert tok.encode("<start_of_turn><mask><end_of_turn>", add_special_tokens=False) == [105, 4, 106]


@pytest.mark.parametrize("vocab_size", [512, 513, 1024, 262144])
def test_exact_vocab_size_and_fast(vocab_size: int) -> None:
    start = time.perf_counter()
    t = build_tokenizer(vocab_size)
    assert time.perf_counter() - start < 2.0
    assert t.vocab_size == vocab_size
    assert t.id_to_token(vocab_size - 1) is not None
    assert t.id_to_token(vocab_size) is None


def test_bpe_merges_are_used() -> None:
    t = build_tokenizer(4096)
    text = "The train left the station and the passengers read newspapers."
    assert len(t.encode(text, add_special_tokens=False)) < len(text.encode()) // 2


def test_deterministic(tmp_path: Path) -> None:
    build_tokenizer(4096).save(tmp_path / "a")
    build_tokenizer(4096).save(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_every_id_decodes(tok: Tokenizer) -> None:
    for i in range(tok.vocab_size):
        assert tok.decode([i]) != "", i
    assert isinstance(tok.decode(list(range(tok.vocab_size))), str)


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # With BOS: decodes with the <bos> text, or without it when skipping special tokens.
    ids_bos = tok.encode(text)
    assert tok.decode(ids_bos) == "<bos>" + text
    assert tok.decode(ids_bos, skip_special_tokens=True) == text


def test_bos_handling(tok: Tokenizer) -> None:
    plain = tok.encode("hi", add_special_tokens=False)
    assert plain[0] != BOS_ID
    assert tok.encode("hi") == [BOS_ID, *plain]
    assert tok.encode("") == [BOS_ID]
    assert tok.encode("", add_special_tokens=False) == []
    # Text that already starts with <bos> does not get a second one.
    assert tok.encode("<bos>hi") == [BOS_ID, *plain]
    assert tok.encode("<bos>hi", add_special_tokens=False) == [BOS_ID, *plain]


def test_decode_inputs(tok: Tokenizer) -> None:
    ids = tok.encode("tensor input", add_special_tokens=False)
    assert tok.decode(torch.tensor(ids)) == "tensor input"
    # Out-of-vocab ids are skipped rather than crashing.
    assert tok.decode([ids[0], 5000, -1, 10**12, *ids[1:]]) == "tensor input"
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids]))
    with pytest.raises(TypeError, match="integer ids"):
        tok.decode(["a"])


# ---------------------------------------------------------------- chat template


def test_chat_template_exact(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
    )
    with_prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert with_prompt == text + "<start_of_turn>model\n"


def test_chat_template_user_only_and_tokenize(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.apply_chat_template(msgs)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [BOS_ID, START_OF_TURN_ID] and ids.count(BOS_ID) == 1
    assert END_OF_TURN_ID in ids
    assert tok.decode(ids) == text


def test_chat_template_raise_exception(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="rejected the conversation: conversation roles must alternate"):
        tok.apply_chat_template(msgs)
    with pytest.raises(ChatTemplateError, match='unknown role "tool"'):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] is missing 'role'"),
        ([{"role": "user"}], r"messages\[0\] is missing 'content'"),
        ([{"role": 1, "content": "hi"}], r"'role'\] must be a string"),
        ([{"role": "user", "content": None}], r"'content'\] must be a string, got NoneType"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], r"'content'\] must be a string, got list"),
    ],
)
def test_bad_message_shape(tok: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


@pytest.mark.parametrize("part_type", ["image", "image_url"])
def test_image_content_refused(tok: Tokenizer, part_type: str) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": part_type}]}]
    with pytest.raises(UnsupportedInputError, match="dgemma is text-only"):
        tok.apply_chat_template(msgs)


def test_missing_template(tok: Tokenizer, tmp_path: Path) -> None:
    t = build_tokenizer(512)
    t.chat_template = None
    t.save(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        loaded.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_template_syntax_and_runtime_error() -> None:
    t = build_tokenizer(512)
    t.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ChatTemplateError, match="not valid jinja"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    t.chat_template = "{{ messages[0].content + 1 }}"
    with pytest.raises(ChatTemplateError, match="failed to render: TypeError"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    assert issubclass(ChatTemplateError, DGemmaError)


def test_template_is_sandboxed() -> None:
    t = build_tokenizer(512)
    t.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError, match="failed to render"):
        t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


# ---------------------------------------------------------------- save / from_dir


def test_save_and_from_dir(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    special = (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["add_bos_token"])
    assert special == ("<bos>", "<eos>", "<pad>", True)
    assert "chat_template" not in cfg

    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (2, 1, 0)
    assert loaded.chat_template == tok.chat_template
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        ids = tok.encode(text)
        assert loaded.decode(ids) == tok.decode(ids)
    assert loaded.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)

    # Saving a loaded tokenizer reproduces the files.
    loaded.save(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_from_dir_config_variants(tmp_path: Path) -> None:
    build_tokenizer(512).save(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # Special tokens as {"content": ...} dicts, add_bos_token false, template only in the config.
    cfg.update(bos_token={"content": "<bos>", "special": True}, eos_token={"content": "<end_of_turn>"},
               add_bos_token=False, chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").unlink()
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_token_id, t.eos_token_id, t.add_bos_token) == (BOS_ID, END_OF_TURN_ID, False)
    assert t.encode("hi") == t.encode("hi", add_special_tokens=False)
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "<bos>x"
    # chat_template.jinja takes precedence over the config's template.
    (tmp_path / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}")
    from_file = Tokenizer.from_dir(tmp_path)
    assert from_file.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "FILE x"
    # Without tokenizer_config.json the Gemma token names are used and BOS is added.
    cfg_path.unlink()
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.add_bos_token) == (2, 1, 0, True)


# ---------------------------------------------------------------- error paths


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing; expected a HuggingFace"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_invalid_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid HuggingFace tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        Tokenizer.from_dir(tmp_path)


def test_invalid_tokenizer_config(tmp_path: Path) -> None:
    build_tokenizer(512).save(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg_path.write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    cfg_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        Tokenizer.from_dir(tmp_path)
    cfg_path.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(CheckpointError, match="bos_token '<s>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_dir(tmp_path)
    cfg_path.write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(CheckpointError, match="'add_bos_token' must be true or false"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- transformers parity


def test_transformers_parity(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert len(hf) == tok.vocab_size
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text)
        assert hf.encode(text) == ids
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    rendered = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(CONVERSATION, tokenize=False)

    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "Hello, world!"
    assert fast.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
