"""HF-format checkpoints: safetensors read/write, key mapping and validation (spec §5).

Reading parses the safetensors header ourselves and memory-maps the data, so a tensor whose dtype already matches
the target is used in place (zero copy) and any other is converted one tensor at a time (a bf16 checkpoint never
passes through an fp32 copy of the model). Corrupt or inconsistent files get errors that name the file, the key
and what was expected.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import TextConfig
from .errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
MAX_HEADER = 100 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TensorRecord:
    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One memory-mapped .safetensors file with a validated header."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            fh = open(path, "rb")
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open weight file ({e.strerror})") from None
        with fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, file has {size})")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start, data_len = 8 + n, size - 8 - n
        self.records: dict[str, TensorRecord] = {}
        for key, info in header.items():
            try:
                dtype_name, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                if not all(type(x) is int for x in (*shape, b, e)):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt header entry for tensor '{key}' (expected dtype, integer "
                                      "shape and integer data_offsets)") from None
            if dtype_name not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {dtype_name}")
            dtype = SAFETENSORS_DTYPES[dtype_name]
            numel = 1
            for s in shape:
                numel *= s
            expected = numel * dtype.itemsize
            if not (0 <= b <= e) or e - b != expected:
                raise CheckpointError(
                    f"{path}: tensor '{key}' has data_offsets [{b}, {e}] but shape {list(shape)} {dtype_name} "
                    f"needs {expected} bytes")
            if e > data_len:
                raise CheckpointError(
                    f"{path}: truncated file: tensor '{key}' ends at byte {data_start + e} but the file has {size} bytes")
            self.records[key] = TensorRecord(path, key, dtype, shape, data_start + b, expected)

    def tensor(self, key: str) -> torch.Tensor:
        """A CPU tensor backed by the memory map (copy-on-write: writes never reach the file)."""
        r = self.records[key]
        if r.nbytes == 0:
            return torch.empty(r.shape, dtype=r.dtype)
        t = torch.frombuffer(self._mm, dtype=torch.uint8, count=r.nbytes, offset=r.start)
        return t.view(r.dtype).view(r.shape)


def open_weights(ckpt_dir: Path) -> tuple[dict[str, TensorRecord], dict[Path, SafetensorsFile]]:
    """Index every tensor of a checkpoint: `model.safetensors` or sharded via `model.safetensors.index.json`."""
    index = ckpt_dir / "model.safetensors.index.json"
    single = ckpt_dir / "model.safetensors"
    files: dict[Path, SafetensorsFile] = {}
    records: dict[str, TensorRecord] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' of key -> shard file") from None
        for shard in sorted(set(weight_map.values())):
            p = ckpt_dir / shard
            if not p.is_file():
                raise CheckpointError(f"{index} lists shard '{shard}', but {p} does not exist")
            files[p] = SafetensorsFile(p)
        for key, shard in weight_map.items():
            f = files[ckpt_dir / shard]
            if key not in f.records:
                raise CheckpointError(f"{index} maps '{key}' to {shard}, but that file has no such tensor")
            records[key] = f.records[key]
    elif single.is_file():
        f = SafetensorsFile(single)
        files[single] = f
        records.update(f.records)
    else:
        raise CheckpointError(
            f"{ckpt_dir}: no weights found; expected model.safetensors or model.safetensors.index.json")
    return records, files


# ---------------------------------------------------------------------------------------------------------------
# key mapping (spec §5.1)
# ---------------------------------------------------------------------------------------------------------------
def expected_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """dgemma parameter/buffer name -> shape. Names are the HF decoder keys without `model.decoder.`;
    the encoder's own layer scalars are `layers.i.enc_layer_scalar`."""
    H, V, I, Ie, E = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.num_experts
    nh = cfg.num_attention_heads
    s: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (V, H), "norm.weight": (H,),
        "self_conditioning.pre_norm.weight": (H,),
        "self_conditioning.gate_proj.weight": (I, H), "self_conditioning.up_proj.weight": (I, H),
        "self_conditioning.down_proj.weight": (H, I),
    }
    for i in range(cfg.num_hidden_layers):
        d, g, p = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), f"layers.{i}."
        s[p + "self_attn.q_proj.weight"] = (nh * d, H)
        s[p + "self_attn.k_proj.weight"] = (g * d, H)
        if not cfg.is_full(i):
            s[p + "self_attn.v_proj.weight"] = (g * d, H)
        s[p + "self_attn.o_proj.weight"] = (H, nh * d)
        s[p + "self_attn.q_norm.weight"] = (d,)
        s[p + "self_attn.k_norm.weight"] = (d,)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                  "pre_feedforward_layernorm_2"):
            s[p + n + ".weight"] = (H,)
        s[p + "mlp.gate_proj.weight"] = (I, H)
        s[p + "mlp.up_proj.weight"] = (I, H)
        s[p + "mlp.down_proj.weight"] = (H, I)
        s[p + "router.proj.weight"] = (E, H)
        s[p + "router.scale"] = (H,)
        s[p + "router.per_expert_scale"] = (E,)
        s[p + "experts.gate_up_proj"] = (E, 2 * Ie, H)
        s[p + "experts.down_proj"] = (E, H, Ie)
        s[p + "layer_scalar"] = (1,)
        s[p + "enc_layer_scalar"] = (1,)
    return s


def hf_key(name: str) -> str:
    """dgemma name -> safetensors key as transformers writes it."""
    if name.endswith(".enc_layer_scalar"):
        return ENCODER + name[: -len("enc_layer_scalar")] + "layer_scalar"
    return DECODER + name


def dgemma_name(key: str) -> str | None:
    """safetensors key -> dgemma name; None for keys that are deliberately skipped (vision, tied lm_head)."""
    if key.startswith(VISION_PREFIXES) or key == "lm_head.weight":
        return None
    if key.startswith(DECODER):
        return key[len(DECODER):]
    if key.startswith(ENCODER):
        rest = key[len(ENCODER):]
        if rest.startswith("layers.") and rest.endswith(".layer_scalar"):
            return rest[: -len("layer_scalar")] + "enc_layer_scalar"
        return rest  # untied encoder copy of a shared weight: maps onto the decoder's (spec §5.1)
    return ""  # unexpected


def stored_dtype(ckpt_dir: Path) -> torch.dtype:
    """The dtype the embedding is stored in (what `load(dtype=None)` uses when config.json names none)."""
    records, _ = open_weights(ckpt_dir)
    rec = records.get(DECODER + "embed_tokens.weight")
    return rec.dtype if rec is not None and rec.dtype.is_floating_point else torch.float32


def read_state_dict(ckpt_dir: Path, cfg: TextConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                    quantized: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Validate a checkpoint against `cfg` and yield (dgemma name, tensor in `dtype` on `device`).
    Tensors come one at a time so the caller can place each before the next is converted.

    `quantized` (a quantized checkpoint): the expected shape and dtype of each quantized part, by dgemma name
    (`layers.0.mlp.up_proj.weight.qdata`, `....scale`; see `quant.py`); those are yielded in their stored dtype.
    In the files a part `X.qdata` is stored under X's key and `X.scale` under X's key + "_scale"."""
    chosen, files, qwant = choose_records(ckpt_dir, cfg, quantized)
    for name, rec in chosen.items():
        t = files[rec.file].tensor(rec.key)
        yield name, t.to(device=device, dtype=qwant[name][1] if name in qwant else dtype)


def choose_records(ckpt_dir: Path, cfg: TextConfig,
                   quantized: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None):
    """Validate a checkpoint's index against `cfg` (see `read_state_dict`): (dgemma name -> TensorRecord, the open
    files, the quantized parts expected)."""
    records, _files = open_weights(ckpt_dir)
    want = expected_shapes(cfg)
    qwant = quantized or {}
    if qwant:
        want = {n: s for n, s in want.items() if n + ".qdata" not in qwant}
        want.update({n: shape for n, (shape, _) in qwant.items()})
    chosen: dict[str, TensorRecord] = {}
    unexpected: list[str] = []
    for key, rec in records.items():
        name = dgemma_name(key)
        if name is None:
            continue
        if qwant and name + ".qdata" in qwant:
            name += ".qdata"
        elif qwant and name.endswith("_scale") and name[: -len("_scale")] + ".scale" in qwant:
            name = name[: -len("_scale")] + ".scale"
        if name not in want:
            unexpected.append(key)
            continue
        if name in chosen and chosen[name].key.startswith(DECODER):
            continue  # the decoder's copy wins over a redundant encoder copy
        chosen[name] = rec
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{ckpt_dir}: unexpected weights for this config: {', '.join(sorted(unexpected)[:5])}{more}. "
            "Does config.json match these weights (num_hidden_layers, layer_types, per-layer overrides)?")
    missing = [quantized_key(n) for n in want if n not in chosen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{ckpt_dir}: missing weights: {', '.join(missing[:5])}{more}")
    for name, rec in chosen.items():
        if rec.shape != want[name]:
            raise CheckpointError(
                f"{rec.file}: tensor '{rec.key}' has shape {list(rec.shape)}, but config.json implies "
                f"{list(want[name])}; the config contradicts the weights")
        if name in qwant:
            if rec.dtype != qwant[name][1]:
                raise CheckpointError(f"{rec.file}: tensor '{rec.key}' has dtype {DTYPE_NAMES[rec.dtype]}, but the "
                                      f"quantization_config implies {DTYPE_NAMES[qwant[name][1]]}")
        elif not (rec.dtype.is_floating_point):
            raise CheckpointError(f"{rec.file}: tensor '{rec.key}' has non-float dtype {DTYPE_NAMES[rec.dtype]}")
    return chosen, _files, qwant


def quantized_key(name: str) -> str:
    """dgemma name -> safetensors key, for quantized parts too (`X.qdata` -> X's key, `X.scale` -> X's key_scale)."""
    if name.endswith(".qdata"):
        return hf_key(name[: -len(".qdata")])
    if name.endswith(".scale") and not name.endswith("router.scale"):
        return hf_key(name[: -len(".scale")]) + "_scale"
    return hf_key(name)


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file (tensors in name order, header padded to 8 bytes), streaming each tensor."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    items = sorted(tensors.items())
    for key, t in items:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for _key, t in items:
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                fh.write(t.view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group keys (in name order) into shards of at most `max_shard_bytes` (a lone larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(sizes):
        if shards[-1] and size + sizes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += sizes[key]
    return shards


def write_weights(out_dir: Path, sizes: dict[str, int], get: Callable[[str], torch.Tensor],
                  max_shard_bytes: int = 5 * 1024**3, progress: Callable[[int], None] | None = None) -> None:
    """Write HF-keyed tensors as model.safetensors, or as shards plus model.safetensors.index.json.

    `sizes` maps each key to its byte size; `get(key)` produces the tensor when its shard is written, so a model
    larger than RAM can be written one shard at a time. `progress(nbytes)` is called after each shard."""
    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / "model.safetensors.index.json"]:
        if stale.exists():
            stale.unlink()
    shards = plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", {k: get(k) for k in shards[0]})
        if progress:
            progress(sum(sizes.values()))
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / name, {k: get(k) for k in keys})
        weight_map.update({k: name for k in keys})
        if progress:
            progress(sum(sizes[k] for k in keys))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
