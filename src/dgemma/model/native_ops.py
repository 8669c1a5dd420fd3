"""The experts of a MoE layer in native code on the CPU, with torch's bits (`csrc/cpu_ops.c`).

On a 2-core CPU a `small` layer's experts took ~0.8 ms through torch: sixteen MKL GEMMs of 8-30 rows, each run
with MKL's two threads but too small to use them, and ~20 ATen calls around them. `dgemma::moe_experts` does the
same arithmetic with the experts spread over OpenMP threads (each GEMM single-threaded, through the same MKL
`sgemm_` torch calls) and the GELU, product, routing weight and slot sum fused: ~0.45 ms.

It is an operator (`torch.ops.dgemma.moe_experts`) so that a TorchScript trace of the decoder pass can hold it, and
it is only used there: `Experts.forward` takes it while `layers.native_cpu_ops()` is active, which only
`model/traced.py` does, and a trace is kept only if its logits equal the eager pass's bit for bit. Before that:

- the library must build and find torch's `sgemm_` and SLEEF `tanh` (torch's own, so the same code), and torch must
  be running its AVX2 kernels (the GELU here is ATen's AVX2 formula);
- a self-check per expert shape compares the operator with the torch path on random routings;
- MKL gives some small row counts different bits on one thread than on several (it splits them differently), so
  each row count is probed once per shape and thread count against `torch.mm`; experts with a count that differs
  run on the calling thread after the others, where MKL threads as torch's call would.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from .. import native
from . import layers

_LOCK = threading.Lock()
_STATE: dict = {}  # "fn": the bound C function or None; "checked": {shape: bool}; "safe": {key: bytearray}
_GRAIN = 32768  # ATen's parallel grain size: larger elementwise ops are split over threads


def _bind():
    """The C entry point with torch's sgemm_ and SLEEF tanh bound into it, or None."""
    if "fn" in _STATE:
        return _STATE["fn"]
    fn = None
    try:
        if torch.backends.cpu.get_cpu_capability() == "AVX2":
            lib = native.library("cpu_ops")
            if lib is not None:
                tl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
                sgemm, tanh8 = getattr(tl, "sgemm_", None), getattr(tl, "Sleef_tanhf8_u10", None)
                if sgemm is not None and tanh8 is not None:
                    addr = ctypes.cast
                    lib.dg_moe_bind(addr(sgemm, ctypes.c_void_p), addr(tanh8, ctypes.c_void_p))
                    _declare(lib)
                    fn = lib
    except (OSError, AttributeError, RuntimeError):
        fn = None
    _STATE["fn"] = fn
    _STATE.setdefault("checked", {})
    _STATE.setdefault("safe", {})
    return fn


def _declare(lib) -> None:
    """Argument types, so that calls pass Python ints (pointers, sizes) and floats without wrapping each one."""
    V, I64, F, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    sigs = {"dg_moe": ([V, I, I, I, V, V, I, V, V, V, I, V, V, V, I], I),
            "dg_transpose_div": ([V, I64, I64, F, V, I], None),
            "dg_pre_ffn": ([V, V, I64, I64, V, V, V, V, F, F, V, V, V, V], None),
            "dg_ffn_tail": ([V, V, V, I64, I64, V, V, V, V, F, V], None),
            "dg_qkv_post": ([V, V, V, I64, I64, I64, I64, I64, V, V, V, V, F, V, V, V], None),
            "dg_norm_ok": ([I64], I)}
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _safe_table(lib, H: int, I: int, upto: int):
    """safe[n]: does an expert GEMM pair over n rows give torch.mm's bits on one thread inside a parallel region?
    Probed on random data (MKL's path depends on the shape, not the values) as row counts first occur; returned as a
    ctypes byte array for the C side."""
    nt = torch.get_num_threads()
    key = (H, I, nt)
    entry = _STATE["safe"].get(key)
    if entry is not None and len(entry) > upto:
        return entry
    table = bytearray(entry or b"")
    g = torch.Generator().manual_seed(len(table))
    for n in range(len(table), max(upto + 1, 2 * len(table))):
        ok = nt > 1 and n > 0
        for K, N in ((H, 2 * I), (I, H)):
            if not ok:
                break
            x = torch.randn(n, K, generator=g)
            w = torch.randn(N, K, generator=g) * 0.05
            out = torch.empty(n, N)
            lib.dg_linear(_p(x), n, K, _p(w), N, _p(out), nt)
            ok = torch.equal(out, torch.mm(x, w.t()))
        table.append(1 if ok else 0)
    entry = _STATE["safe"][key] = (ctypes.c_ubyte * len(table))(*table)
    return entry


def _aligned_gelu(S: int, I: int) -> bool:
    """Does ATen's GELU over the [S, I] gate take its vector path for every element? Rows of I % 16 == 0 elements,
    and where the op is split over threads, every split falls on a row boundary."""
    if I % 16:
        return False
    n = S * I
    nt = torch.get_num_threads()
    if n < _GRAIN or nt == 1:
        return True
    nt = min(nt, -(-n // _GRAIN))
    return (-(-n // nt)) % I == 0


def _run(lib, x, perm, counts, weights, gate_up, down) -> torch.Tensor:
    T, H = x.shape
    E, I2, _ = gate_up.shape
    I = I2 // 2
    K = weights.shape[-1]
    S = T * K
    safe = _safe_table(lib, H, I, S)
    out = torch.empty(T, H, dtype=torch.float32)
    ws = torch.empty(S * (2 * H + 3 * I), dtype=torch.float32)
    r = lib.dg_moe(x.data_ptr(), T, H, K, perm.data_ptr(), counts.data_ptr(), E, weights.data_ptr(),
                   gate_up.data_ptr(), down.data_ptr(), I, ctypes.addressof(safe), out.data_ptr(), ws.data_ptr(),
                   torch.get_num_threads())
    if r != 0:
        raise RuntimeError("dgemma: native experts refused this shape")
    return out


def _impl(x, perm, counts, weights, gate_up, down):
    lib = _STATE.get("fn") or _bind()
    if lib is None or not (x.dtype == weights.dtype == gate_up.dtype == down.dtype == torch.float32
                           and x.device.type == "cpu" and perm.dtype == counts.dtype == torch.int64):
        raise RuntimeError("dgemma::moe_experts takes CPU float32 tensors (int64 perm and counts) and needs the "
                           "native library")
    return _run(lib, x.contiguous(), perm.contiguous(), counts.contiguous(), weights.contiguous(),
                gate_up.contiguous(), down.contiguous())


def _transpose_div(x, d):
    lib = _STATE.get("fn") or _bind()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        raise RuntimeError("dgemma::transpose_div takes a 2-D CPU float32 tensor and needs the native library")
    x = x.contiguous()
    V, N = x.shape
    out = torch.empty(N, V, dtype=torch.float32)
    lib.dg_transpose_div(x.data_ptr(), V, N, d, out.data_ptr(), torch.get_num_threads())
    return out


_LIB = torch.library.Library("dgemma", "DEF")
_LIB.define("moe_experts(Tensor x, Tensor perm, Tensor counts, Tensor weights, Tensor gate_up, Tensor down) -> Tensor")
_LIB.impl("moe_experts", _impl, "CPU")
_LIB.define("transpose_div(Tensor x, float d) -> Tensor")  # out[n, v] = x[v, n] / d
_LIB.impl("transpose_div", _transpose_div, "CPU")


_F32 = torch.float32


def _all_f32(*ts: torch.Tensor) -> bool:
    return all(t.dtype is _F32 and t.device.type == "cpu" for t in ts)


def _pre_ffn(x, o, w_pa, w_pre, w_pre2, scale, root, eps):
    lib = _STATE.get("fn") or _bind()
    D = x.shape[-1]
    if lib is None or D % 32 or D >= 512 or o.shape != x.shape or not _all_f32(x, o, w_pa, w_pre, w_pre2, scale):
        raise RuntimeError("dgemma::pre_ffn: unsupported shape or dtype, or no native library")
    x, o = x.contiguous(), o.contiguous()
    outs = [torch.empty(x.shape, dtype=_F32) for _ in range(4)]
    lib.dg_pre_ffn(x.data_ptr(), o.data_ptr(), x.numel() // D, D, w_pa.data_ptr(), w_pre.data_ptr(),
                   w_pre2.data_ptr(), scale.data_ptr(), root, eps, *[t.data_ptr() for t in outs])
    return tuple(outs)


def _ffn_tail(x, h1, h2, w1, w2, w, scalar, eps):
    lib = _STATE.get("fn") or _bind()
    D = x.shape[-1]
    if (lib is None or D % 32 or D >= 512 or h1.shape != x.shape or h2.shape != x.shape or scalar.numel() != 1
            or not _all_f32(x, h1, h2, w1, w2, w, scalar)):
        raise RuntimeError("dgemma::ffn_tail: unsupported shape or dtype, or no native library")
    x, h1, h2, scalar = x.contiguous(), h1.contiguous(), h2.contiguous(), scalar.contiguous()
    out = torch.empty(x.shape, dtype=_F32)
    lib.dg_ffn_tail(x.data_ptr(), h1.data_ptr(), h2.data_ptr(), x.numel() // D, D, w1.data_ptr(), w2.data_ptr(),
                    w.data_ptr(), scalar.data_ptr(), eps, out.data_ptr())
    return out


_LIB.define("pre_ffn(Tensor x, Tensor o, Tensor w_pa, Tensor w_pre, Tensor w_pre2, Tensor scale, float root, "
            "float eps) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.impl("pre_ffn", _pre_ffn, "CPU")
_LIB.define("ffn_tail(Tensor x, Tensor h1, Tensor h2, Tensor w1, Tensor w2, Tensor w, Tensor scalar, float eps) "
            "-> Tensor")
_LIB.impl("ffn_tail", _ffn_tail, "CPU")


def _qkv_post(q, k, v, cos, sin, wq, wk, nh, g, eps):
    lib = _STATE.get("fn") or _bind()
    B, S = q.shape[0], q.shape[1]
    d = q.shape[-1] // nh
    if (lib is None or d % 32 or d >= 512 or cos.dim() != 2 or tuple(cos.shape) != (S, d) or sin.shape != cos.shape
            or k.shape[-1] != g * d or (v is not None and v.shape != k.shape) or not _all_f32(q, k, cos, sin, wq, wk)
            or (v is not None and not _all_f32(v))):
        raise RuntimeError("dgemma::qkv_post: unsupported shape or dtype, or no native library")
    q, k, cos, sin = q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous()
    v = v.contiguous() if v is not None else None
    qo = torch.empty(B, S, nh, d, dtype=_F32)
    ko = torch.empty(B, S, g, d, dtype=_F32)
    vo = torch.empty(B, S, g, d, dtype=_F32)
    lib.dg_qkv_post(q.data_ptr(), k.data_ptr(), v.data_ptr() if v is not None else None, B * S, S, nh, g, d,
                    cos.data_ptr(), sin.data_ptr(), wq.data_ptr(), wk.data_ptr(), eps, qo.data_ptr(), ko.data_ptr(),
                    vo.data_ptr())
    return qo, ko, vo


_LIB.define("qkv_post(Tensor q, Tensor k, Tensor? v, Tensor cos, Tensor sin, Tensor wq, Tensor wk, int nh, int g, "
            "float eps) -> (Tensor, Tensor, Tensor)")
_LIB.impl("qkv_post", _qkv_post, "CPU")


def layer_glue_usable(x: torch.Tensor, D: int) -> bool:
    """Can `pre_ffn` and `ffn_tail` stand in for the norms and residual adds around a layer's FFN on x (rows of D,
    given as an int: while tracing, x's sizes are tensors)?"""
    if not (layers.native_active() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled()):
        return False
    lib = _STATE.get("fn") or _bind()
    return lib is not None and bool(lib.dg_norm_ok(D))


def transpose_usable(x: torch.Tensor) -> bool:
    """Can `transpose_div` bring the weight-first head product back (CPU fp32, no gradients, the library built)?
    Its numbers are a copy and one IEEE division, the same as torch's; the trace check confirms it as for the rest."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and layers.native_active() and (_STATE.get("fn") or _bind()) is not None)


def usable(x: torch.Tensor, T: int, K: int, E: int, H: int, I: int) -> bool:
    """Can `moe_experts` stand in for the torch path for x [T, H] routed to K of E experts of inter size I (and has
    it been checked for this shape)? The sizes come as ints: while tracing, a tensor's own sizes are tensors."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and not torch.is_grad_enabled()):
        return False
    if not _aligned_gelu(T * K, I):
        return False
    key = (E, I, H, K, torch.get_num_threads())
    ok = _STATE.get("checked", {}).get(key)
    if ok is None:
        if torch._C._get_tracing_state() is not None:
            return False  # a check now would be recorded into the trace: warm up eagerly first (model/traced.py)
        with _LOCK:
            ok = _bind() is not None and _self_check(E, I, H, K)
            _STATE["checked"][key] = ok
    return ok


def _self_check(E: int, I: int, H: int, K: int) -> bool:
    """The operator against the torch path on random weights and routings (a few token counts, skewed and even)."""
    from .layers import Experts

    class _Cfg:
        num_experts, hidden_size, moe_intermediate_size, top_k_experts = E, H, I, K

    ex = Experts(_Cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.05)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.05)
        for T in (1, 3, 17, 64):
            if not _aligned_gelu(T * K, I):
                continue
            x = torch.randn(T, H, generator=g)
            logits = torch.randn(T, E, generator=g) * (1 + T % 3)
            w, idx = torch.softmax(logits, -1).topk(min(K, E), dim=-1)
            w = w / w.sum(-1, keepdim=True)
            want = ex.torch_forward(x, w, idx)
            flat = idx.reshape(-1)
            sorted_ids, perm = torch.sort(flat)
            counts = torch.bincount(sorted_ids, minlength=E)
            try:
                got = torch.ops.dgemma.moe_experts(x, perm, counts, w, ex.gate_up_proj, ex.down_proj)
            except RuntimeError:
                return False
            if not torch.equal(got, want):
                return False
    return True
