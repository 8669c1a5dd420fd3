"""`dgemma bench`: batch-size-1 speed of diffusion decoding, side by side with the transformers reference and with
dgemma's autoregressive mode on the same backbone, against the weight-read floor.

Modes (each timed after a warm-up, median of `repeats` runs):
- `fixed16`, `fixed48`: diffusion with that many denoising steps per canvas, early stopping off
  (confidence_threshold 1e-12, EOS off), so every run does the same work;
- `adaptive`: diffusion with the checkpoint's sampler settings (early stopping on; EOS off so the length is fixed);
- `ar`: greedy next-token decoding through the causal encoder and the tied head, with the KV cache;
- `reference-fixed16`, `reference-fixed48`, `reference-adaptive`: the transformers reference
  (`torch.manual_seed(seed); model.generate(...)`) on the same checkpoint, when transformers is installed and the
  model is a checkpoint directory; its tokens are compared with dgemma's (`same_tokens`).

Per mode: end-to-end and decode tok/s, time to first token (first committed canvas; first token for `ar`),
prefill (encode) ms, ms per denoising step (median over steps that do not include an encode), per-canvas latency,
tokens per forward, peak memory, and the weight-read floor: the bytes of weights one decoder pass touches (all
non-expert weights, the tied head, and the experts the pass's tokens can reach, E·(1−(1−k/E)^T) per layer for T
tokens under uniform routing) over the memory bandwidth measured here by a large copy. `floor_ratio` = floor ms /
measured ms per pass (1.0 = at the floor).
"""

from __future__ import annotations

import json
import math
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import DGemmaError

DIFFUSION_MODES = ("fixed16", "fixed48", "adaptive")
ALL_MODES = DIFFUSION_MODES + ("ar",)
NO_EARLY_STOP = 1e-12  # confidence threshold no canvas reaches: every canvas runs all its steps


@dataclass
class ModeResult:
    mode: str
    new_tokens: int
    total_s: float
    e2e_tok_s: float
    decode_tok_s: float | None  # None: not measured (the reference's prefill is not timed separately)
    ttft_ms: float | None
    prefill_ms: float | None
    ms_per_step: float | None  # one decoder pass (one token for `ar`)
    canvas_ms: float | None
    steps: int  # decoder passes in the run
    tokens_per_forward: float
    peak_mem_mb: float  # CUDA: max allocated during the mode (loaded models included); CPU: process peak RSS
    floor_ms: float | None = None
    floor_ratio: float | None = None
    same_tokens: bool | None = None  # reference modes, dgemma's reference sampler: the same tokens for the seed
    runs_s: list[float] = field(default_factory=list)
    warmup_s: float | None = None  # the untimed first run (with compile: compiling included)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def measure_bandwidth(dev: torch.device, mbytes: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large device-local copy (bytes read + bytes written)."""
    n = mbytes * 2**20 // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(dev)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return 2 * n * 4 / min(times)


def pass_weight_bytes(cfg: Any, tokens: int, itemsize: int, quantized_itemsize: float | None = None) -> int:
    """Bytes of weights one forward pass over `tokens` tokens reads (see module docstring). `quantized_itemsize`:
    bytes per weight of the quantized matrices (scales included); the embedding / tied head stays at `itemsize`
    (norms and the router are counted with the matrices: under 0.1% of the weights)."""
    c = cfg.param_counts()
    E, K = cfg.num_experts, cfg.top_k_experts
    frac = 1.0 - (1.0 - K / E) ** tokens  # expected share of a layer's experts that some token routes to
    q = itemsize if quantized_itemsize is None else quantized_itemsize
    return int(c["embedding"] * itemsize + (c["total"] - c["embedding"] - c["experts"] + c["experts"] * frac) * q)


def quantized_itemsize(backbone: Any) -> float | None:
    """Bytes per weight of a backbone's quantized matrices (None when it has none)."""
    from .quant import QTensor

    qs = [m for m in backbone.modules() if isinstance(m, QTensor)]
    if not qs:
        return None
    return sum(m.nbytes() for m in qs) / sum(math.prod(m.shape) for m in qs)


def random_model(preset: str, device: str | torch.device | None = None, dtype: str | None = None, seed: int = 0,
                 quantize: str | None = None):
    """The preset's architecture with random weights, built directly on `device` (nothing read or written).

    Unlike `presets.random_tensor` (deterministic per tensor name, drawn in fp32 on the CPU, for checkpoints on disk)
    this draws each tensor on the device in the compute dtype: the 26B model's 50 GB appear in seconds and never pass
    through host memory. Only speed is measured with it, so the values need not match a written checkpoint.
    `quantize` ("fp8" | "int4"): each matrix is quantized as soon as it is drawn, so the float model never exists
    whole (the 26B int4 model fits a 24 GB card)."""
    from .api import DiffusionGemma, resolve_device, resolve_dtype
    from .presets import PRESETS, preset_config

    if preset not in PRESETS:
        raise DGemmaError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    cfg, gcfg = preset_config(preset)
    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, "bfloat16" if dev.type == "cuda" else "float32")
    from . import quant

    scheme = quant.Scheme(quantize) if quantize else None
    model = DiffusionGemma(cfg, random_backbone(cfg.text, dev, tdtype, seed, scheme), gcfg.merged(), None)
    if scheme is not None:
        model.config.quantization_config = scheme.to_config()
    return model


def random_backbone(text_cfg: Any, device: torch.device, dtype: torch.dtype, seed: int = 0, scheme: Any = None):
    """A Backbone of `text_cfg` in eval mode with every tensor drawn on `device` in `dtype`: N(0, 0.02) for
    matrices, ones for norms, scales and layer scalars; with `scheme` (quant.Scheme) the matrices quantized."""
    from . import quant
    from .model import Backbone

    with torch.device("meta"):
        bb = Backbone(text_cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    drawn = bb.state_dict()
    groups = quant.prepare(bb, scheme) if scheme is not None else {}
    state = {}
    for name, t in drawn.items():
        x = torch.empty(t.shape, dtype=dtype, device=device)
        if name.endswith("layer_scalar") or t.ndim == 1:
            x.fill_(1.0)
        else:
            x.normal_(0.0, 0.02, generator=g)
        if name in groups:
            state[name + ".qdata"], state[name + ".scale"] = quant.quantize(x, scheme.format, groups[name])
            del x
        else:
            state[name] = x
    bb.load_state_dict(state, strict=True, assign=True)
    bb.eval().requires_grad_(False)
    return bb


def _gen_kwargs(mode: str, new_tokens: int) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, eos_token_id=None)
    if mode.endswith("fixed16") or mode.endswith("fixed48"):
        kw.update(max_denoising_steps=int(mode[-2:]), confidence_threshold=NO_EARLY_STOP)
    return kw


def _time_prefill(model: Any, ids: torch.Tensor, repeats: int) -> float:
    bb, dev = model.backbone, model.device
    times = []
    for _ in range(repeats + 1):
        cache = bb.new_cache(ids.shape[0], ids.shape[1])
        _sync(dev)
        t = time.perf_counter()
        with torch.no_grad():
            bb.encode(ids, cache, None)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


def _run_diffusion(model: Any, ids: torch.Tensor, mode: str, new_tokens: int, seed: int, sampler: str = "fast",
                   compile: bool | None = None) -> tuple[dict, Any]:
    dev = model.device
    marks: list[tuple[str, int, float]] = []  # (kind, canvas index, time)

    def on_step(info: Any) -> None:
        _sync(dev)
        marks.append(("step", info.canvas_index, time.perf_counter()))

    def on_canvas(info: Any) -> None:
        marks.append(("canvas", info.index, time.perf_counter()))

    _sync(dev)
    t0 = time.perf_counter()
    out = model.generate(ids, seed=seed, on_step=on_step, on_canvas=on_canvas, sampler=sampler, compile=compile,
                         **_gen_kwargs(mode, new_tokens))
    _sync(dev)
    total = time.perf_counter() - t0
    step_dts, prev = [], None
    for kind, c, t in marks:
        if kind == "step":
            if prev is not None and prev[0] == "step" and prev[1] == c:
                step_dts.append(t - prev[2])  # a pure denoising pass (no encode in between)
        prev = (kind, c, t)
    canvas_t = [t for kind, _, t in marks if kind == "canvas"]
    canvas_dts = [b - a for a, b in zip([t0] + canvas_t[:-1], canvas_t)]
    stats = dict(total=total, ttft=(canvas_t[0] - t0) if canvas_t else total,
                 step=statistics.median(step_dts) if step_dts else None,
                 canvas=statistics.mean(canvas_dts) if canvas_dts else None,
                 steps=sum(1 for k, _, _ in marks if k == "step"),
                 tpf=float(out.tokens_per_forward.float().mean()))
    return stats, out


def _run_ar(model: Any, ids: torch.Tensor, new_tokens: int, compile: bool | None = None) -> tuple[dict, Any]:
    dev = model.device
    _sync(dev)
    t0 = time.perf_counter()
    out = model.generate_ar(ids, max_new_tokens=new_tokens, eos_token_id=None, compile=compile)
    _sync(dev)
    total = time.perf_counter() - t0
    return dict(total=total, ttft=None, step=None, canvas=None, steps=new_tokens, tpf=1.0), out


def _run_reference(ref: Any, ids: torch.Tensor, mode: str, new_tokens: int, seed: int) -> tuple[dict, Any]:
    kw = _gen_kwargs(mode.replace("reference-", ""), new_tokens)
    dev = next(ref.parameters()).device
    _sync(dev)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = ref.generate(ids.to(dev), **kw)
    _sync(dev)
    total = time.perf_counter() - t0
    tpf = float(out.tokens_per_forward.float().mean())
    passes = round((out.sequences.shape[1] - ids.shape[1]) / tpf)
    # no step hooks in the reference: ms per pass is the whole run over its decoder passes (encodes included)
    return dict(total=total, ttft=None, step=total / max(1, passes), canvas=None, steps=passes, tpf=tpf), out


def run_bench(model: Any, *, modes: list[str], prompt_len: int = 128, new_tokens: int = 256, batch: int = 1,
              repeats: int = 2, seed: int = 0, reference: Any = None, sampler: str = "fast",
              compile: bool | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time each mode; returns {"env", "settings", "floor", "results": [ModeResult as dict, ...]}.

    sampler: dgemma's sampler for the diffusion modes; `same_tokens` (vs the reference) is only defined for
    "reference". compile: torch.compile the fast step (None: `step.compile_default`); each mode's first
    (warm-up) run includes compiling, reported as `compile_s`."""
    from .step import compile_default

    if compile is None:
        compile = compile_default(model.device)
    dev = model.device
    cfg = model.config.text
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (batch, prompt_len), generator=g)
    special = [t for t in (getattr(model.config, "image_token_id", None), getattr(model.config, "boi_token_id", None),
                           getattr(model.config, "eoi_token_id", None)) if t is not None]
    if special:  # a random prompt must not contain image placeholders (text-only input is validated)
        ids = torch.where(torch.isin(ids, torch.tensor(special)), torch.full_like(ids, 4), ids)
    ids = ids.to(dev)
    itemsize = model.dtype.itemsize
    bw = measure_bandwidth(dev)
    L = model.config.canvas_length
    qsize = quantized_itemsize(model.backbone)
    floors = {"diffusion_pass_bytes": pass_weight_bytes(cfg, batch * L, itemsize, qsize),
              "ar_pass_bytes": pass_weight_bytes(cfg, batch, itemsize, qsize), "bandwidth_gb_s": bw / 1e9,
              "weights": (model.config.quantization_config or {}).get("format") or str(model.dtype).removeprefix(
                  "torch.")}
    floors["diffusion_pass_ms"] = floors["diffusion_pass_bytes"] / bw * 1e3
    floors["ar_pass_ms"] = floors["ar_pass_bytes"] / bw * 1e3
    prefill_ms = _time_prefill(model, ids, repeats)
    results: list[ModeResult] = []
    ours: dict[str, torch.Tensor] = {}
    todo = list(modes)
    if reference is not None:
        todo += [f"reference-{m}" for m in modes if m in DIFFUSION_MODES]
    for mode in todo:
        if progress:
            progress(mode)
        runs = []
        _peak_reset(dev)
        for r in range(repeats + 1):  # the first run warms up
            if mode == "ar":
                stats, out = _run_ar(model, ids, new_tokens, compile)
            elif mode.startswith("reference-"):
                stats, out = _run_reference(reference, ids, mode, new_tokens, seed)
            else:
                stats, out = _run_diffusion(model, ids, mode, new_tokens, seed, sampler, compile)
            if r > 0:
                runs.append(stats)
            else:
                warmup = stats["total"]
        seq = out.sequences.cpu()
        new = int(seq.shape[1] - prompt_len) * batch
        best = min(runs, key=lambda s: s["total"])
        total = statistics.median(s["total"] for s in runs)
        floor = floors["ar_pass_ms"] if mode == "ar" else floors["diffusion_pass_ms"]
        if mode == "ar":
            step = (total * 1e3 - prefill_ms) / max(1, new // batch)
            ttft = prefill_ms + step
        else:
            step = best["step"] * 1e3 if best["step"] is not None else None
            ttft = best["ttft"] * 1e3 if best["ttft"] is not None else None
        is_ref = mode.startswith("reference-")
        res = ModeResult(
            mode=mode, new_tokens=new, total_s=total, e2e_tok_s=new / total,
            decode_tok_s=None if is_ref else new / max(1e-9, total - prefill_ms / 1e3),
            ttft_ms=ttft,
            prefill_ms=None if is_ref else prefill_ms,  # the reference's own prefill is not timed
            ms_per_step=step, canvas_ms=best["canvas"] * 1e3 if best["canvas"] else None,
            steps=best["steps"] or 0, tokens_per_forward=best["tpf"], peak_mem_mb=_peak_mb(dev),
            floor_ms=floor, floor_ratio=(floor / step) if step else None, runs_s=[s["total"] for s in runs],
            warmup_s=warmup)
        if mode.startswith("reference-"):
            mine = ours.get(mode.replace("reference-", ""))
            if sampler == "reference":
                res.same_tokens = bool(mine is not None and torch.equal(mine, seq))
        else:
            ours[mode] = seq
        results.append(res)
    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu"),
           "threads": torch.get_num_threads(), "dtype": str(model.dtype).replace("torch.", "")}
    settings = {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch, "repeats": repeats,
                "seed": seed, "canvas_length": L, "params": cfg.param_counts(), "sampler": sampler,
                "compile": bool(compile)}
    return {"env": env, "settings": settings, "floor": floors, "results": [asdict(r) for r in results]}


def format_table(report: dict[str, Any]) -> str:
    rows = [("mode", "tok/s e2e", "tok/s decode", "TTFT ms", "prefill ms", "ms/pass", "canvas ms", "passes",
             "tok/fwd", "peak MB", "floor ms", "of floor", "same tokens", "warm-up s")]

    def f(x: Any, nd: int = 1) -> str:
        if x is None or (isinstance(x, float) and x != x):
            return "-"
        if isinstance(x, bool):
            return "yes" if x else "NO"
        return f"{x:.{nd}f}" if isinstance(x, float) else str(x)

    for r in report["results"]:
        rows.append((r["mode"], f(r["e2e_tok_s"]), f(r["decode_tok_s"]), f(r["ttft_ms"]), f(r["prefill_ms"]),
                     f(r["ms_per_step"], 2), f(r["canvas_ms"]), f(r["steps"]), f(r["tokens_per_forward"], 2),
                     f(r["peak_mem_mb"], 0), f(r["floor_ms"], 3),
                     f(r["floor_ratio"] * 100, 1) + "%" if r["floor_ratio"] else "-", f(r["same_tokens"]),
                     f(r.get("warmup_s"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    e, s, fl = report["env"], report["settings"], report["floor"]
    q = f" · weights {fl['weights']}" if fl.get("weights") in ("fp8", "int4") else ""
    head = (f"dgemma bench · {e['device']} · torch {e['torch']} · {e['dtype']}{q} · {e['threads']} threads · "
            f"{e['date']}\n"
            f"prompt {s['prompt_len']}, {s['new_tokens']} new tokens, batch {s['batch']}, canvas {s['canvas_length']}, "
            f"median of {s['repeats']} after a warm-up · sampler {s.get('sampler', 'fast')}, compile "
            f"{'on' if s.get('compile') else 'off'} · bandwidth {fl['bandwidth_gb_s']:.1f} GB/s · weights per "
            f"pass: diffusion {fl['diffusion_pass_bytes'] / 1e6:.1f} MB, ar {fl['ar_pass_bytes'] / 1e6:.1f} MB")
    return head + "\n" + "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def save_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
