"""Quantized weights: FP8 (e4m3, one scale per output channel) and int4 (symmetric, one scale per group of input
columns, two weights per byte). See docs/quantization.md for the checkpoint layout.

A quantized matrix is a `QTensor` module in place of the layer's parameter (`q_proj.weight`, `experts.down_proj`,
...); `ops.linear` and `ops.expert_mm` recognise it. What is quantized: the attention, dense-MLP,
self-conditioning-MLP and expert projections (over 97% of the 26B model's weights). The embedding (also the tied
head), the norms, the router and the scalars keep the model dtype.

Execution (`QTensor.linear`, `expert_mm`):
- FP8 on a CUDA device that has FP8 tensor cores (compute capability 8.9+): W8A8 through torch's scaled GEMMs,
  with each activation row quantized to e4m3 on the fly (its own scale): `torch._scaled_mm` for a matrix,
  `torch._scaled_grouped_mm` for the experts.
- int4 on a CUDA device with Triton installed (groups of 32–256, powers of two): W4A16 through dgemma's Triton
  kernel, which dequantizes inside the (grouped) GEMM, so the weight is read as 4-bit codes (`int4_kernel.py`).
- Everything else (CPU, int4 without Triton, FP8 on older GPUs): the weight is dequantized to the activation dtype
  inside the product: one matrix at a time; the experts one group at a time on a CPU and one layer at a time on a
  GPU (no host sync). No dequantized copy of the model ever exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import int4_kernel
from .errors import DGemmaError

FORMATS = ("fp8", "int4")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn
INT4_MAX = 7  # symmetric levels -7..7 (stored +8 in a nibble: 1..15)
GROUP_SIZES = (128, 64, 32)  # int4 default: the largest that divides the tensor's input dimension
INT4_SCALE_DTYPE = torch.bfloat16
SCALE_SUFFIX = "_scale"


class QuantError(DGemmaError):
    """A quantization request or quantized checkpoint that dgemma cannot use."""


# ------------------------------------------------------------------------------------------------------------
# which tensors
# ------------------------------------------------------------------------------------------------------------
_QUANTIZED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
              "experts.gate_up_proj", "experts.down_proj")


def is_quantized_name(name: str) -> bool:
    """dgemma parameter names that a quantized checkpoint stores quantized (matrices [out, in] or [E, out, in])."""
    if name.startswith("layers."):
        return name.endswith(_QUANTIZED)
    return name.startswith("self_conditioning.") and name.endswith("_proj.weight")


@dataclass(frozen=True)
class Scheme:
    """`format` "fp8" | "int4"; `group_size` for int4 (None: per tensor, the largest of 128/64/32 that divides)."""

    format: str
    group_size: int | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise QuantError(f"unknown quantization format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.group_size is not None:
            if self.format != "int4":
                raise QuantError("--group-size applies to int4 only (fp8 has one scale per output channel)")
            if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
                raise QuantError(f"group size {self.group_size!r} is invalid; expected an even integer such as 32, "
                                 "64 or 128")

    def group_for(self, name: str, in_features: int) -> int | None:
        """The int4 group of a tensor's input dimension (None for fp8); QuantError if none divides it."""
        if self.format != "int4":
            return None
        if self.group_size is not None:
            if in_features % self.group_size:
                fits = ", ".join(str(g) for g in GROUP_SIZES if in_features % g == 0) or "none of 128/64/32"
                raise QuantError(f"group size {self.group_size} does not divide the input dimension {in_features} "
                                 f"of tensor '{name}'; choose a divisor (e.g. {fits}) or omit --group-size to choose "
                                 "per tensor")
            return self.group_size
        for g in GROUP_SIZES:
            if in_features % g == 0:
                return g
        raise QuantError(f"no int4 group size of {', '.join(map(str, GROUP_SIZES))} divides the input dimension "
                         f"{in_features} of tensor '{name}'; pass --group-size with a divisor")

    def to_config(self) -> dict:
        d = {"quant_method": "dgemma", "format": self.format}
        if self.format == "fp8":
            d.update(weight_dtype="float8_e4m3fn", scale="per output channel, float32", activations=
                     "dynamic per-token e4m3 on FP8 GPUs, else bf16/fp32 (weights dequantized)")
        else:
            d.update(bits=4, symmetric=True, group_size=self.group_size or "auto (128, 64 or 32 per tensor)",
                     scale="per group of input columns, bfloat16",
                     packing="uint8, two weights per byte, low nibble = even column, stored as q + 8")
        return d

    @classmethod
    def from_config(cls, d: object, source: str) -> "Scheme":
        if not isinstance(d, dict) or d.get("quant_method") != "dgemma" or d.get("format") not in FORMATS:
            raise QuantError(f"{source}: quantization_config {d!r} is not one dgemma reads; expected "
                             "{\"quant_method\": \"dgemma\", \"format\": \"fp8\" | \"int4\", ...} (written by "
                             "`dgemma quantize`)")
        g = d.get("group_size")
        return cls(d["format"], g if isinstance(g, int) else None)


# ------------------------------------------------------------------------------------------------------------
# quantize / dequantize (pure tensor functions)
# ------------------------------------------------------------------------------------------------------------
def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (e4m3 [..., out, in], fp32 scale [..., out]) with w ≈ q · scale. An all-zero row gets
    scale 1."""
    w = w.float()
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None].float()).to(dtype)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (uint8 [..., out, in/2], bf16 scale [..., out, in/group]): per group of `group` input
    columns, q = round(w / s) in -7..7 with s = max|w| / 7 (s rounded to bf16 first, so dequantization uses the
    stored scale); column 2j in the low nibble of byte j, 2j+1 in the high one, each stored as q + 8."""
    *lead, out, cols = w.shape
    if cols % group or group % 2:
        raise QuantError(f"int4 group {group} does not divide the input dimension {cols} (or is odd)")
    g = w.float().reshape(*lead, out, cols // group, group)
    amax = g.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax)).to(INT4_SCALE_DTYPE)
    q = torch.round(g / scale.float()[..., None]).clamp(-INT4_MAX, INT4_MAX).to(torch.int16) + 8
    q = q.reshape(*lead, out, cols).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> int8 [..., 2n] in -8..7 (the inverse of the packing in `quantize_int4`)."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q · s in `dtype`. For bf16 / fp32 the product is formed in that dtype directly (q and the bf16 scale are
    exact there, so this is the fp32 product rounded once, without an fp32 copy of the weight)."""
    q = unpack_int4(packed)
    *lead, out, cols = q.shape
    groups = scale.shape[-1]
    work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    w = q.view(*lead, out, groups, cols // groups).to(work) * scale.to(work)[..., None]
    return w.view(*lead, out, cols).to(dtype)


def quantize(w: torch.Tensor, fmt: str, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8(w) if fmt == "fp8" else quantize_int4(w, group)


def dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_fp8(q, scale, dtype) if fmt == "fp8" else dequantize_int4(q, scale, dtype)


def error_bound(w: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """The largest |w − dequantize(quantize(w))| the scheme allows, elementwise: e4m3 rounds to 3 mantissa bits
    (half an ulp: |w|/16, or s·2⁻¹⁰ among the subnormals); int4 rounds to half a step, s/2 (+ the bf16 rounding
    of s times 7)."""
    if fmt == "fp8":
        s = scale.float()[..., None]
        return torch.maximum(w.float().abs() / 16, s * 2.0 ** -10) * (1 + 1e-6)
    *lead, out, cols = w.shape
    groups = scale.shape[-1]
    s = scale.float()[..., None].expand(*lead, out, groups, cols // groups).reshape(*lead, out, cols)
    return s * (0.5 + INT4_MAX * 2.0 ** -8) + 1e-12


# ------------------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------------------
class QTensor(nn.Module):
    """A quantized weight of logical shape [out, in] or [E, out, in], in place of the layer's parameter.
    Buffers: `qdata` (e4m3 or packed uint8) and `scale`."""

    def __init__(self, fmt: str, qdata: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.format = fmt
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)

    @classmethod
    def empty(cls, fmt: str, shape: tuple[int, ...], group: int | None, device: torch.device | str = "meta"):
        *lead, out, cols = shape
        if fmt == "fp8":
            return cls(fmt, torch.empty(shape, dtype=FP8, device=device),
                       torch.empty(*lead, out, dtype=torch.float32, device=device))
        return cls(fmt, torch.empty(*lead, out, cols // 2, dtype=torch.uint8, device=device),
                   torch.empty(*lead, out, cols // group, dtype=INT4_SCALE_DTYPE, device=device))

    @property
    def shape(self) -> torch.Size:
        s = self.qdata.shape
        return s if self.format == "fp8" else torch.Size((*s[:-1], 2 * s[-1]))

    @property
    def group_size(self) -> int | None:
        return None if self.format == "fp8" else self.shape[-1] // self.scale.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def nbytes(self) -> int:
        return self.qdata.numel() * self.qdata.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, self.format, dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] · Wᵀ -> [M, out] in x's dtype."""
        if self.format == "fp8" and fp8_gemm_available(x.device):
            return fp8_linear(x, self.qdata, self.scale)
        if self.format == "int4" and int4_kernel.available(x, self.group_size):
            y = _int4_grouped_mm(x.reshape(-1, x.shape[-1]), self.qdata[None], self.scale[None], None)
            return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        g = f", group {self.group_size}" if self.format == "int4" else ""
        return f"{self.format}, shape {list(self.shape)}{g}"


def fp8_gemm_available(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper, Blackwell)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row activation quantization: x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """W8A8: x [M, in] (rows quantized here) · wq [out, in]ᵀ with row-wise scales, through `torch._scaled_mm`
    (also runs on a CPU, which is how it is tested). The output dtype is x's (bf16/fp32/fp16)."""
    xq, xs = quantize_rows_fp8(x)
    out_dtype = x.dtype
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.float()[None, :], out_dtype=out_dtype)


def fp8_linear_twin(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """`fp8_linear` in plain PyTorch: the same quantized operands, dequantized, multiplied in fp32."""
    xq, xs = quantize_rows_fp8(x)
    return ((xq.float() * xs) @ (wq.float() * ws.float()[:, None]).t()).to(x.dtype)


# ------------------------------------------------------------------------------------------------------------
# the experts' grouped product
# ------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dgemma::int4_grouped_mm", mutates_args=())
def _int4_grouped_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor | None
                     ) -> torch.Tensor:
    """The Triton W4A16 kernel as one opaque op (for torch.compile); offs None: one group of all rows."""
    if offs is None:
        offs = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
    return int4_kernel.grouped_mm(x, qdata, scale, offs)


@_int4_grouped_mm.register_fake
def _(x, qdata, scale, offs):
    return x.new_empty(x.shape[0], qdata.shape[1])


@torch.library.custom_op("dgemma::dequant_grouped_mm", mutates_args=())
def _dequant_grouped_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor,
                        fmt: str) -> torch.Tensor:
    """x [M, in] sorted by group, weights [G, out, in] quantized: one product per non-empty group, its weight
    dequantized to x's dtype just for it (so at most one expert is ever dequantized). On CUDA the layer's experts
    are dequantized at once instead and run as one grouped product: reading the group sizes back to the host
    would stall the GPU and break CUDA-graph capture."""
    if x.device.type == "cuda":
        from .model.ops import _grouped_mm

        return _grouped_mm(x, dequantize(qdata, scale, fmt, x.dtype).transpose(-2, -1), offs)
    G = qdata.shape[0]
    out_features = qdata.shape[1]
    out = x.new_zeros(x.shape[0], out_features)
    start = 0
    for g, end in enumerate(offs.tolist()[:G]):
        if end > start:
            w = dequantize(qdata[g], scale[g], fmt, x.dtype)
            torch.mm(x[start:end], w.t(), out=out[start:end])
        start = end
    return out


@_dequant_grouped_mm.register_fake
def _(x, qdata, scale, offs, fmt):
    return x.new_empty(x.shape[0], qdata.shape[1])


def fp8_grouped_mm(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """W8A8 grouped: x [M, in] sorted by group, wq [G, out, in] e4m3, ws [G, out]; `torch._scaled_grouped_mm`
    (CUDA, Hopper) with per-row activation scales and per-channel weight scales. Output bf16."""
    xq, xs = quantize_rows_fp8(x)
    y = torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs.view(-1), ws.float(), offs=offs,
                                 out_dtype=torch.bfloat16)
    return y.to(x.dtype)


def fp8_grouped_mm_twin(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`fp8_grouped_mm` in plain PyTorch (any device): the same quantized operands, per group in fp32."""
    xq, xs = quantize_rows_fp8(x)
    xd = xq.float() * xs
    out = torch.zeros(x.shape[0], wq.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = xd[start:end] @ (wq[g].float() * ws[g].float()[:, None]).t()
        start = end
    return out.to(x.dtype)


def expert_mm(x: torch.Tensor, w: QTensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, in] · w[g]ᵀ per group g (rows sorted by group, `offs` cumulative int32 counts)."""
    if w.format == "fp8" and fp8_gemm_available(x.device) and hasattr(torch, "_scaled_grouped_mm"):
        return fp8_grouped_mm(x, w.qdata, w.scale, offs)
    if w.format == "int4" and int4_kernel.available(x, w.group_size):
        return _int4_grouped_mm(x, w.qdata, w.scale, offs)
    return _dequant_grouped_mm(x, w.qdata, w.scale, offs, w.format)


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------
def _set(module: nn.Module, name: str, value: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    if attr in parent._parameters:
        del parent._parameters[attr]
    setattr(parent, attr, value)


def quantized_names(module: nn.Module) -> Iterator[str]:
    for name, _ in list(module.named_parameters()):
        if is_quantized_name(name):
            yield name


def prepare(backbone: nn.Module, scheme: Scheme, device: torch.device | str = "meta") -> dict[str, int | None]:
    """Replace each quantizable parameter of a (meta) backbone by an empty QTensor; returns name -> int4 group."""
    groups = {}
    for name in list(quantized_names(backbone)):
        shape = tuple(backbone.get_parameter(name).shape)
        g = scheme.group_for(name, shape[-1])
        _set(backbone, name, QTensor.empty(scheme.format, shape, g, device))
        groups[name] = g
    return groups


def quantize_module(backbone: nn.Module, scheme: Scheme) -> None:
    """Quantize a loaded backbone in place, one tensor at a time (each freed as soon as it is quantized)."""
    for name in list(quantized_names(backbone)):
        w = backbone.get_parameter(name)
        g = scheme.group_for(name, w.shape[-1])
        q, s = quantize(w.detach(), scheme.format, g)
        _set(backbone, name, QTensor(scheme.format, q, s))
        del w


def quantize_stream(tensors: Iterator[tuple[str, torch.Tensor]], fmt: str, groups: dict[str, int | None]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float tensor) pairs -> the same with each tensor named in `groups` replaced by its quantized parts
    (name.qdata, name.scale), one tensor at a time."""
    for name, t in tensors:
        if name in groups:
            q, s = quantize(t, fmt, groups[name])
            del t
            yield name + ".qdata", q
            yield name + ".scale", s
        else:
            yield name, t


def parts(backbone: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The quantized parts of a backbone (`X.qdata`, `X.scale` for each QTensor X) -> (shape, dtype)."""
    out = {}
    for mn, m in backbone.named_modules():
        if isinstance(m, QTensor):
            for bn in ("qdata", "scale"):
                b = getattr(m, bn)
                out[f"{mn}.{bn}"] = (tuple(b.shape), b.dtype)
    return out


def is_quantized(backbone: nn.Module) -> str | None:
    for m in backbone.modules():
        if isinstance(m, QTensor):
            return m.format
    return None


def weight_bytes(shapes: dict[str, tuple[int, ...]], dtype_bytes: int, scheme: Scheme | None) -> int:
    """Bytes of a checkpoint's weights: `shapes` (dgemma name -> shape) in `dtype_bytes`, the quantized ones in
    `scheme`."""
    total = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        if scheme is None or not is_quantized_name(name):
            total += n * dtype_bytes
        elif scheme.format == "fp8":
            total += n + 4 * n // shape[-1]
        else:
            g = scheme.group_for(name, shape[-1])
            total += n // 2 + 2 * n // g
    return total


# ------------------------------------------------------------------------------------------------------------
# writing checkpoints (streamed: one float tensor in memory at a time)
# ------------------------------------------------------------------------------------------------------------
def write_weights(out_dir, shapes: dict[str, tuple[int, ...]], source, dtype_of, scheme: Scheme | None,
                  max_shard_bytes: int = 2 * 1024**3, progress=None) -> int:
    """Write a checkpoint's weights, the quantizable ones in `scheme` (None: none quantized).

    shapes: dgemma name -> shape; source(name): the float tensor (made or read only when its shard is written);
    dtype_of(name): the dtype a non-quantized tensor is written in; progress(done, total) after each tensor.
    Returns the bytes written."""
    from . import checkpoint

    layout: dict[str, tuple[str, str | None]] = {}  # key -> (name, None | "qdata" | "scale")
    sizes: dict[str, int] = {}
    groups: dict[str, int | None] = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        if scheme is None or not is_quantized_name(name):
            key = checkpoint.hf_key(name)
            layout[key], sizes[key] = (name, None), n * dtype_of(name).itemsize
            continue
        groups[name] = g = scheme.group_for(name, shape[-1])
        q = checkpoint.quantized_key(name + ".qdata")
        s = checkpoint.quantized_key(name + ".scale")
        layout[q], layout[s] = (name, "qdata"), (name, "scale")
        if scheme.format == "fp8":
            sizes[q], sizes[s] = n, 4 * (n // shape[-1])
        else:
            sizes[q], sizes[s] = n // 2, 2 * (n // g)
    total, done = sum(sizes.values()), 0
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the tensor quantized last (its two parts)

    def get(key: str) -> torch.Tensor:
        nonlocal done
        name, part = layout[key]
        if part is None:
            t = source(name).to(dtype_of(name))
        else:
            if name not in last:
                last.clear()
                last[name] = quantize(source(name), scheme.format, groups[name])
            t = last[name][0 if part == "qdata" else 1]
        done += sizes[key]
        if progress:
            progress(done, total)
        return t

    checkpoint.write_weights(out_dir, sizes, get, max_shard_bytes)
    return total


@dataclass
class QuantizePlan:
    """A validated float checkpoint to quantize (`plan_quantize`): its config, tensor records and sizes."""

    src: object
    scheme: Scheme
    config: object
    records: dict
    files: dict
    in_bytes: int
    out_bytes: int


def plan_quantize(src, scheme: Scheme) -> QuantizePlan:
    """Check that `src` is a float checkpoint `scheme` can quantize (config, weights, every group size) before
    anything is written; QuantError / CheckpointError otherwise."""
    from pathlib import Path

    from . import checkpoint
    from .config import ModelConfig

    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise QuantError(f"{src}: no config.json; expected an HF-format DiffusionGemma checkpoint directory")
    cfg = ModelConfig.from_file(cfg_path)
    if cfg.quantization_config:
        raise QuantError(f"{src} is already quantized ({cfg.quantization_config.get('format', '?')}); quantize the "
                         "original float checkpoint")
    chosen, files, _ = checkpoint.choose_records(src, cfg.text)
    shapes = {n: rec.shape for n, rec in chosen.items()}
    out = sum(weight_bytes({n: shapes[n]}, chosen[n].dtype.itemsize, scheme) for n in shapes)  # checks groups
    return QuantizePlan(src, scheme, cfg, chosen, files, sum(r.nbytes for r in chosen.values()), out)


def quantize_checkpoint(plan: QuantizePlan, dst, progress=None, max_shard_bytes: int = 2 * 1024**3) -> int:
    """`dgemma quantize`: read the planned float checkpoint tensor by tensor (memory-mapped) and write `dst` with
    the quantizable tensors in the plan's scheme, the rest in their stored dtype; copy the config (with a
    quantization_config), generation config, tokenizer and chat template. Returns the weight bytes written."""
    import copy
    import json
    import shutil
    from pathlib import Path

    src, dst = Path(plan.src), Path(dst)
    if dst.exists() and src.resolve() == dst.resolve():
        raise QuantError("the output directory must differ from the input")
    chosen, files = plan.records, plan.files
    dst.mkdir(parents=True, exist_ok=True)
    total = write_weights(dst, {n: r.shape for n, r in chosen.items()},
                          lambda n: files[chosen[n].file].tensor(chosen[n].key), lambda n: chosen[n].dtype,
                          plan.scheme, max_shard_bytes, progress)
    cfg = copy.copy(plan.config)
    cfg.quantization_config = plan.scheme.to_config()
    (dst / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model") and not f.name.endswith(".tmp"):
            shutil.copy2(f, dst / f.name)
    return total
