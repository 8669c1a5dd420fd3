"""Checkpoint loading, validation and saving (spec §5): dgemma.load / DiffusionGemma.save against checkpoints that
transformers wrote (conftest.ckpt_factory), plus every way a checkpoint can be broken.

Fixture checkpoints are session-scoped and shared: a test that breaks one copies it into tmp_path first.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dgemma
from dgemma import CheckpointError, ConfigError, DGemmaError, UnsupportedInputError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threading only adds overhead (and stalls badly on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spec(ckpt_factory) -> Path:
    return ckpt_factory("spec")


def copy_ckpt(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_config(ckpt: Path, fn: Callable[[dict], None], name: str = "config.json") -> None:
    cfg = json.loads((ckpt / name).read_text())
    fn(cfg)
    (ckpt / name).write_text(json.dumps(cfg, indent=2))


def edit_tensors(ckpt: Path, fn: Callable[[dict[str, torch.Tensor]], None], file: str = WEIGHTS) -> None:
    sd = {k: v.clone() for k, v in load_file(ckpt / file).items()}
    fn(sd)
    save_file(sd, ckpt / file, metadata={"format": "pt"})


def read_raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def params(model: dgemma.DiffusionGemma) -> dict[str, torch.Tensor]:
    return dict(model.backbone.state_dict())


def assert_same_params(a: dgemma.DiffusionGemma, b: dgemma.DiffusionGemma) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert torch.equal(pa[k], pb[k]), k


def prompt_and_canvas(vocab: int, canvas_length: int, seed: int = 0, prompt_len: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, prompt_len), generator=g)
    canvas = torch.randint(0, vocab, (1, canvas_length), generator=g)
    return ids, canvas


@torch.no_grad()
def dg_logits(model: dgemma.DiffusionGemma, ids: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    bb = model.backbone
    cache = bb.new_cache(ids.shape[0], ids.shape[1] + canvas.shape[1])
    bb.encode(ids, cache)
    return bb.denoise(canvas, cache)


@torch.no_grad()
def ref_logits(ref, ids: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    ref.model.encoder(input_ids=ids, past_key_values=cache, position_ids=torch.arange(ids.shape[1])[None])
    return ref(past_key_values=cache, decoder_input_ids=canvas).logits


def hf_load(path: Path):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, attn_implementation="eager").eval()


def load(path: Path, **kw) -> dgemma.DiffusionGemma:
    return dgemma.load(path, device="cpu", **kw)


# ---------------------------------------------------------------- directory and config.json


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(missing))}: checkpoint directory not found"):
        load(missing)


def test_missing_config(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config\.json.*expected an HF-format DiffusionGemma"):
        load(ck)


def test_config_invalid_json(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    (ck / "config.json").write_text('{"model_type": "diffusion_gemma", ')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load(ck)


def test_config_not_an_object(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    (ck / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object"):
        load(ck)


def test_wrong_model_type(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    edit_config(ck, lambda c: c.update(model_type="gemma3"))
    with pytest.raises(ConfigError, match=r"config\.json: model_type is 'gemma3'.*model_type 'diffusion_gemma'"):
        load(ck)


def test_missing_text_config(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    edit_config(ck, lambda c: c.pop("text_config"))
    with pytest.raises(ConfigError, match=r"config\.json: 'text_config' is missing"):
        load(ck)


def test_layer_types_length_mismatch(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    edit_config(ck, lambda c: c["text_config"]["layer_types"].pop())
    with pytest.raises(ConfigError, match=r"layer_types has 3 entries but num_hidden_layers is 4"):
        load(ck)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", "64"), ("vocab_size", None), ("num_hidden_layers", "4"), ("num_experts", "4"),
    ("per_layer_config", {"1": {"head_dim": 32}, "x": {}}),
])
def test_config_wrong_value_type(spec: Path, tmp_path: Path, field: str, value) -> None:
    ck = copy_ckpt(spec, tmp_path)
    edit_config(ck, lambda c: c["text_config"].__setitem__(field, value))
    with pytest.raises(ConfigError, match=rf"text_config\.{field}.*(integer|int\b|object|layer index)"):
        load(ck)


def test_generation_config_invalid_json(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    (ck / "generation_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"generation_config\.json: not valid JSON"):
        load(ck)


def test_all_errors_are_dgemma_errors() -> None:
    assert issubclass(CheckpointError, DGemmaError)
    assert issubclass(ConfigError, DGemmaError)
    assert issubclass(UnsupportedInputError, DGemmaError)


# ---------------------------------------------------------------- weight files and index


def test_no_weights(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    (ck / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"no weights found; expected model\.safetensors or "
                                              r"model\.safetensors\.index\.json"):
        load(ck)


def make_sharded(src: Path, tmp_path: Path) -> Path:
    """A copy of `src` split by hand into two shards plus an index (independent of dgemma's writer)."""
    ck = copy_ckpt(src, tmp_path, "sharded")
    sd = load_file(ck / WEIGHTS)
    (ck / WEIGHTS).unlink()
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for shard, ks in halves.items():
        save_file({k: sd[k] for k in ks}, ck / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in ks})
    (ck / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ck


def test_hand_sharded_checkpoint_loads(spec: Path, tmp_path: Path) -> None:
    assert_same_params(load(make_sharded(spec, tmp_path)), load(spec))


def test_index_lists_missing_shard(spec: Path, tmp_path: Path) -> None:
    ck = make_sharded(spec, tmp_path)
    (ck / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json lists shard "
                                              r"'model-00002-of-00002\.safetensors', but .* does not exist"):
        load(ck)


def test_index_maps_key_to_wrong_shard(spec: Path, tmp_path: Path) -> None:
    ck = make_sharded(spec, tmp_path)
    index = json.loads((ck / INDEX).read_text())
    key = next(k for k, s in index["weight_map"].items() if s == "model-00002-of-00002.safetensors")
    index["weight_map"][key] = "model-00001-of-00002.safetensors"
    (ck / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"maps '{re.escape(key)}' to model-00001-of-00002\.safetensors, "
                                              r"but that file has no such tensor"):
        load(ck)


def test_index_invalid(spec: Path, tmp_path: Path) -> None:
    ck = make_sharded(spec, tmp_path)
    for text in ("{not json", '{"metadata": {}}', '{"weight_map": [1, 2]}'):
        (ck / INDEX).write_text(text)
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: expected a JSON object with a "
                                                  r"'weight_map'"):
            load(ck)


# ---------------------------------------------------------------- tensors vs config


def test_missing_tensor(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    key = "model.decoder.layers.1.self_attn.k_proj.weight"
    edit_tensors(ck, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing weights: {re.escape(key)}$"):
        load(ck)


def test_missing_encoder_layer_scalar(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    key = "model.encoder.language_model.layers.2.layer_scalar"  # the encoder's own buffer, never tied
    edit_tensors(ck, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing weights: {re.escape(key)}"):
        load(ck)


def test_encoder_copy_of_shared_weight_is_used(spec: Path, tmp_path: Path) -> None:
    """spec §5.1: a `model.encoder.language_model.X` parameter maps onto `model.decoder.X`."""
    ck = copy_ckpt(spec, tmp_path)

    def move(sd):
        sd["model.encoder.language_model.norm.weight"] = sd.pop("model.decoder.norm.weight")

    edit_tensors(ck, move)
    assert_same_params(load(ck), load(spec))


def test_unexpected_tensor(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    edit_tensors(ck, lambda sd: sd.update({"model.decoder.layers.99.foo": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected weights for this config: model\.decoder\.layers\.99\.foo\."):
        load(ck)


def test_unexpected_tensor_outside_known_prefixes(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    edit_tensors(ck, lambda sd: sd.update({"something.else.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected weights for this config: something\.else\.weight"):
        load(ck)


def test_wrong_shape(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    key = "model.decoder.layers.0.mlp.gate_proj.weight"  # [I, H] = [96, 64]
    edit_tensors(ck, lambda sd: sd.update({key: torch.zeros(95, 64)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(key)}' has shape \[95, 64\], "
                                              r"but config\.json implies \[96, 64\]"):
        load(ck)


def test_non_float_tensor(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    key = "model.decoder.norm.weight"
    edit_tensors(ck, lambda sd: sd.update({key: torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(key)}' has non-float dtype I32"):
        load(ck)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", 32, r"tensor 'model\.decoder\.embed_tokens\.weight' has shape \[256, 64\], but config\.json "
                        r"implies \[256, 32\]; the config contradicts the weights"),
    ("vocab_size", 300, r"'model\.decoder\.embed_tokens\.weight' has shape \[256, 64\], but config\.json implies "
                        r"\[300, 64\]"),
    ("intermediate_size", 100, r"tensor 'model\.decoder\.\S+' has shape \[(96, 64|64, 96)\], but config\.json "
                               r"implies \[(100, 64|64, 100)\]"),
    ("num_experts", 3, r"tensor 'model\.decoder\.\S+' has shape \[4(, \d+)*\], but config\.json implies \[3(, \d+)*\]"),
    ("head_dim", 8, r"tensor 'model\.decoder\.layers\.0\.self_attn\.[qko]_\w+\.weight' has shape \[\d+(, \d+)?\], "
                    r"but config\.json implies"),
    ("num_hidden_layers", 3, r"unexpected weights for this config: .*model\.decoder\.layers\.3\..*"
                             r"Does config\.json match these weights"),
    ("num_hidden_layers", 5, r"missing weights: model\.decoder\.layers\.4\.self_attn\.q_proj\.weight"),
])
def test_config_contradicts_weights(spec: Path, tmp_path: Path, field: str, value: int, match: str) -> None:
    ck = copy_ckpt(spec, tmp_path)

    def edit(c):
        t = c["text_config"]
        t[field] = value
        if field == "num_hidden_layers":
            t["layer_types"] = (t["layer_types"] * 2)[:value]
            t["per_layer_config"] = {k: v for k, v in t["per_layer_config"].items() if int(k) < value}
        if field == "num_experts":
            t["top_k_experts"] = 2

    edit_config(ck, edit)
    with pytest.raises(CheckpointError, match=match):
        load(ck)


def test_layer_types_contradict_weights(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    edit_config(ck, lambda c: c["text_config"]["layer_types"].__setitem__(0, "full_attention"))
    # a full layer has no v_proj, so the sliding layer's v_proj is unexpected
    with pytest.raises(CheckpointError, match=r"unexpected weights for this config: "
                                              r"model\.decoder\.layers\.0\.self_attn\.v_proj\.weight"):
        load(ck)


# ---------------------------------------------------------------- corrupt safetensors files


def test_truncated_file(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    raw = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: truncated file: tensor '.+' ends at byte \d+ "
                                              rf"but the file has {len(raw) // 2} bytes"):
        load(ck)


def test_truncated_inside_header(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    raw = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(raw[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors file "
                                              r"\(header claims \d+ bytes, file has 100\)"):
        load(ck)


def test_garbage_at_start(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    raw = bytearray((ck / WEIGHTS).read_bytes())
    raw[:16] = b"\xde\xad\xbe\xef" * 4
    (ck / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        load(ck)


def test_header_length_larger_than_file(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    raw = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: corrupt or truncated safetensors file "
                                              rf"\(header claims {len(raw) + 1000} bytes, file has {len(raw)}\)"):
        load(ck)


def test_header_not_json(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    raw = bytearray((ck / WEIGHTS).read_bytes())
    raw[8:40] = b"\x00\xff garbage garbage garbage \xfe\x01"
    (ck / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load(ck)


def test_header_offsets_disagree_with_shape(spec: Path, tmp_path: Path) -> None:
    ck = copy_ckpt(spec, tmp_path)
    header, data = read_raw(ck / WEIGHTS)
    key = "model.decoder.norm.weight"
    b, e = header[key]["data_offsets"]
    header[key]["data_offsets"] = [b, e - 4]
    write_raw(ck / WEIGHTS, header, data)
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(key)}' has data_offsets \[{b}, {e - 4}\] but shape "
                                              rf"\[64\] F32 needs 256 bytes"):
        load(ck)


def test_load_bf16_weights_without_config_dtype(ckpt_factory, tmp_path: Path) -> None:
    ck = copy_ckpt(ckpt_factory("spec", torch.bfloat16), tmp_path)
    edit_config(ck, lambda c: c.pop("dtype"))
    assert load(ck).dtype == torch.bfloat16


def test_load_bf16_checkpoint_no_copy(ckpt_factory) -> None:
    """Tensors already in the target dtype are used in place from the file mapping (checkpoint.py docstring):
    two tensors from one file sit exactly as far apart in memory as in the file."""
    ck = ckpt_factory("spec", torch.bfloat16)
    header, _ = read_raw(ck / WEIGHTS)
    m = load(ck)
    k1, k2 = "model.decoder.embed_tokens.weight", "model.decoder.layers.1.self_attn.q_proj.weight"
    t1, t2 = m.backbone.embed_tokens.weight, m.backbone.layers[1].self_attn.q_proj.weight
    assert t2.data_ptr() - t1.data_ptr() == header[k2]["data_offsets"][0] - header[k1]["data_offsets"][0]
    before = (ck / WEIGHTS).read_bytes()
    with torch.no_grad():
        t1.add_(1)  # copy-on-write mapping: the file is never modified
    assert (ck / WEIGHTS).read_bytes() == before


# ---------------------------------------------------------------- generation_config.json


@pytest.mark.parametrize("variant,eos", [("spec", 1), ("wide", [1, 7])])
def test_generation_config_absent(ckpt_factory, tmp_path: Path, variant: str, eos) -> None:
    ck = copy_ckpt(ckpt_factory(variant), tmp_path)
    (ck / "generation_config.json").unlink()
    m = load(ck)
    assert m.generation_config.eos_token_id == eos
    assert m.generation_config.pad_token_id == 0
    g = m.resolve_generation_config()
    assert g.eos_ids == (eos if isinstance(eos, list) else [eos])
    assert (g.max_new_tokens, g.max_denoising_steps, g.entropy_bound, g.t_min, g.t_max, g.stability_threshold,
            g.confidence_threshold) == (256, 48, 0.1, 0.4, 0.8, 1, 0.005)
    out = m.generate([[5, 6, 7]], max_new_tokens=m.config.canvas_length, max_denoising_steps=3, seed=0)
    assert out.sequences.shape == (1, 3 + m.config.canvas_length)


def test_generation_config_present(spec: Path) -> None:
    g = load(spec).generation_config
    assert (g.eos_token_id, g.pad_token_id, g.bos_token_id, g.entropy_bound) == (1, 0, 2, 0.1)


# ---------------------------------------------------------------- saving


@pytest.fixture
def reference_logits(spec: Path, load_reference):
    ref = load_reference(spec)
    ids, canvas = prompt_and_canvas(256, 8)
    return ids, canvas, ref_logits(ref, ids, canvas)


def test_save_round_trip_dgemma(spec: Path, tmp_path: Path) -> None:
    m = load(spec)
    out = tmp_path / "out"
    m.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", WEIGHTS]
    m2 = load(out)
    assert_same_params(m, m2)
    assert m2.config.text == m.config.text
    assert m2.config.canvas_length == m.config.canvas_length
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "diffusion_gemma" and cfg["dtype"] == "float32"
    assert "per_layer_config" in cfg["text_config"]  # the transformers 5.23 form
    g = m2.generation_config
    assert (g.eos_token_id, g.pad_token_id, g.bos_token_id, g.entropy_bound, g.max_denoising_steps) == (1, 0, 2, 0.1, 48)


def test_save_round_trip_transformers(spec: Path, tmp_path: Path, reference_logits) -> None:
    ids, canvas, want = reference_logits
    m = load(spec)
    torch.testing.assert_close(dg_logits(m, ids, canvas), want, atol=1e-5, rtol=0)
    out = tmp_path / "out"
    m.save(out)
    with safe_open(out / WEIGHTS, "pt") as f:
        keys = set(f.keys())
    with safe_open(spec / WEIGHTS, "pt") as f:
        text_keys = {k for k in f.keys() if "vision" not in k}
    assert keys == text_keys  # the same keys transformers writes, minus vision
    ref2 = hf_load(out)  # vision weights missing -> random init with a warning (expected)
    # bit-identical weights; the logits may differ in the last bits with memory alignment of the mmapped weights
    torch.testing.assert_close(ref_logits(ref2, ids, canvas), want, atol=1e-5, rtol=0)


def test_save_released_form_writes_523_form(ckpt_factory, tmp_path: Path) -> None:
    m = load(ckpt_factory("spec", released_form=True))
    m.save(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["text_config"]["per_layer_config"] == {"1": {"head_dim": 32, "num_key_value_heads": 1},
                                                      "3": {"head_dim": 32, "num_key_value_heads": 1}}
    assert_same_params(load(tmp_path / "out"), load(ckpt_factory("spec")))


def test_save_sharded(spec: Path, tmp_path: Path, reference_logits) -> None:
    ids, canvas, want = reference_logits
    m = load(spec)
    out = tmp_path / "out"
    m.save(out, max_shard_bytes=200_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / WEIGHTS).exists()
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for s in shards:
        assert (out / s).stat().st_size <= 200_000 + 16_384  # tensors + header
    total = sum(t.numel() * t.element_size() for t in params(m).values())
    assert index["metadata"]["total_size"] == total
    m2 = load(out)
    assert_same_params(m, m2)
    # same weights at other addresses: fp32 matmul kernels may round differently with alignment
    torch.testing.assert_close(dg_logits(m2, ids, canvas), dg_logits(m, ids, canvas), atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_logits(hf_load(out), ids, canvas), want, atol=1e-5, rtol=0)


def test_save_over_previous_save(spec: Path, tmp_path: Path) -> None:
    """Re-saving into a directory replaces stale shards / single files (no mixed leftovers)."""
    m = load(spec)
    out = tmp_path / "out"
    m.save(out, max_shard_bytes=200_000)
    m.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", WEIGHTS]
    assert_same_params(load(out), m)


def test_save_bf16(spec: Path, tmp_path: Path) -> None:
    m = load(spec)
    out = tmp_path / "out"
    m.save(out, dtype="bfloat16")
    assert m.dtype == torch.float32  # saving does not change the model
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    header, _ = read_raw(out / WEIGHTS)
    header.pop("__metadata__", None)
    assert header and {v["dtype"] for v in header.values()} == {"BF16"}
    m2 = load(out)
    assert m2.dtype == torch.bfloat16
    p2 = params(m2)
    for k, v in params(m).items():
        assert torch.equal(p2[k], v.to(torch.bfloat16)), k
