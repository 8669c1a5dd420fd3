"""Native operators for the CPU trace of the decoder pass, with torch's bits (`csrc/cpu_ops.c`).

Once the trace (model/traced.py) had taken Python out of a `small` pass on a 2-core CPU, its time went to the MoE
experts (sixteen MKL GEMMs of 8-30 rows per layer, each run on MKL's two threads but too small to use them, and ~20
ATen calls around them), to torch's strided copy of the transposed head product, and to hundreds of small ATen calls
(an RMSNorm is seven). These operators do the same arithmetic in fewer, fused calls:

- `moe_experts`: a layer's experts spread over OpenMP threads, each GEMM through the `sgemm_` torch calls, run
  single-threaded, with the GELU (ATen's AVX2 formula, SLEEF's tanh from torch's own library), product, routing
  weight and slot sum fused (0.75 -> 0.44 ms a layer);
- `transpose_div`: the weight-first head product brought back to [N, V], with the softcap's division on the way;
- `qkv_post`, `pre_ffn`, `ffn_tail`: a layer's RMSNorms, RoPE and residual adds (ATen's sum order reproduced).

They are `torch.ops.dgemma.*` operators so that a TorchScript trace can hold them, and they are used only there:
the model code takes them while `layers.native_cpu_ops()` is active, which only `model/traced.py` does, and a trace
is kept only if its logits equal the eager pass's bit for bit. Besides that check:

- the library must build and find torch's `sgemm_` and SLEEF `tanh`, and torch must be running its AVX2 kernels;
- the experts are self-checked against the torch path per shape (token count included) on random routings, and
  used only where ATen's GELU takes its vector path for every element (rows of 16k, thread splits on 16);
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

_LOCK = threading.RLock()
# "fn": the bound library or None; "checked": {shape: bool}; "safe": {(H, I, threads): ctypes byte array}
_STATE: dict = {}
_F32 = torch.float32
_NORM_MAX = 512  # RMSNorm rows the C code reproduces: multiples of 32 up to this (see csrc/cpu_ops.c)


def _bind():
    """The library with torch's sgemm_ and SLEEF tanh bound into it, or None."""
    fn = _STATE.get("fn")
    if fn is not None or "fn" in _STATE:
        return fn
    with _LOCK:
        if "fn" in _STATE:
            return _STATE["fn"]
        _STATE.setdefault("checked", {})
        _STATE.setdefault("safe", {})
        fn = None
        try:
            if torch.backends.cpu.get_cpu_capability() == "AVX2":
                lib = native.library("cpu_ops")
                if lib is not None:
                    tl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
                    sgemm, tanh8 = getattr(tl, "sgemm_", None), getattr(tl, "Sleef_tanhf8_u10", None)
                    if sgemm is not None and tanh8 is not None:
                        lib.dg_moe_bind(ctypes.cast(sgemm, ctypes.c_void_p), ctypes.cast(tanh8, ctypes.c_void_p))
                        _declare(lib)
                        fn = lib
        except (OSError, AttributeError, RuntimeError):
            fn = None
        _STATE["fn"] = fn
        return fn


def _declare(lib) -> None:
    """Argument types, so that calls pass Python ints (pointers, sizes) and floats without wrapping each one."""
    V, I64, F, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    sigs = {"dg_moe": ([V, I, I, I, V, V, I, V, V, V, I, V, V, V, I], I),
            "dg_linear": ([V, I, I, V, I, V, I], None),
            "dg_transpose_div": ([V, I64, I64, F, V, I], None),
            "dg_pre_ffn": ([V, V, I64, I64, V, V, V, V, F, F, V, V, V, V], None),
            "dg_ffn_tail": ([V, V, V, I64, I64, V, V, V, V, F, V], None),
            "dg_qkv_post": ([V, V, V, I64, I64, I64, I64, I64, V, V, V, V, F, V, V, V], None)}
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res


def _lib():
    lib = _STATE.get("fn") or _bind()
    if lib is None:
        raise RuntimeError("dgemma's native CPU operators are not available here (see dgemma/native.py)")
    return lib


def _all_f32(*ts: torch.Tensor) -> bool:
    return all(t.dtype is _F32 and t.device.type == "cpu" for t in ts)


def norm_size_ok(D: int) -> bool:
    return 0 < D <= _NORM_MAX and D % 32 == 0


# ---------------------------------------------------------------------------------------------------------------
# moe_experts
# ---------------------------------------------------------------------------------------------------------------
def _safe_table(lib, H: int, I: int, upto: int):
    """safe[n]: does an expert GEMM pair over n rows give torch.mm's bits on one thread inside a parallel region?
    Probed on random data (MKL's path depends on the shape, not the values) for every count up to `upto` the first
    time that many are needed (doubling, so a growing batch probes rarely); a ctypes byte array for the C side."""
    nt = torch.get_num_threads()
    key = (H, I, nt)
    entry = _STATE["safe"].get(key)
    if entry is not None and len(entry) > upto:
        return entry
    with _LOCK:
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
                lib.dg_linear(x.data_ptr(), n, K, w.data_ptr(), N, out.data_ptr(), nt)
                ok = torch.equal(out, torch.mm(x, w.t()))
            table.append(1 if ok else 0)
        entry = _STATE["safe"][key] = (ctypes.c_ubyte * len(table))(*table)  # replaced whole: readers keep theirs
        return entry


def _moe_experts(x, perm, counts, weights, gate_up, down):
    lib = _lib()
    T, H = x.shape
    E, I2, H2 = gate_up.shape
    I, K = I2 // 2, weights.shape[-1]
    if not (_all_f32(x, weights, gate_up, down) and perm.dtype == counts.dtype == torch.int64 and H2 == H
            and tuple(down.shape) == (E, H, I) and tuple(weights.shape) == (T, K) and perm.numel() == T * K
            and counts.numel() == E and I2 % 16 == 0):
        raise RuntimeError("dgemma::moe_experts: x [T, H] and weights [T, K] (float32), perm [T*K] and counts [E] "
                           "(int64), gate_up [E, 2I, H] and down [E, H, I] (float32)")
    x, perm, counts, weights = x.contiguous(), perm.contiguous(), counts.contiguous(), weights.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    S = T * K
    safe = _safe_table(lib, H, I, S)
    out = torch.empty(T, H, dtype=_F32)
    ws = torch.empty(S * (2 * H + 3 * I), dtype=_F32)
    r = lib.dg_moe(x.data_ptr(), T, H, K, perm.data_ptr(), counts.data_ptr(), E, weights.data_ptr(),
                   gate_up.data_ptr(), down.data_ptr(), I, ctypes.addressof(safe), out.data_ptr(), ws.data_ptr(),
                   torch.get_num_threads())
    if r != 0:
        raise RuntimeError("dgemma::moe_experts: counts must sum to T*K and perm hold slot ids below T*K")
    return out


def usable(x: torch.Tensor, T: int, K: int, E: int, H: int, I: int) -> bool:
    """Can `moe_experts` stand in for the torch path for x [T, H] routed to K of E experts of inter size I (and has
    it been checked for this shape)? The sizes come as ints: while tracing, a tensor's own sizes are tensors."""
    if not (x.device.type == "cpu" and x.dtype == _F32 and x.dim() == 2 and not torch.is_grad_enabled()):
        return False
    # MKL's bits can depend on the rows' alignment, which the scratch layout ties to H: whole cache lines only
    if I % 16 or H % 16 or not layers.gelu_all_vector(T * K * I):
        return False
    key = (E, I, H, K, T, torch.get_num_threads())
    ok = _STATE.get("checked", {}).get(key)
    if ok is None:
        if torch._C._get_tracing_state() is not None:
            return False  # a check now would be recorded into the trace: warm up eagerly first (model/traced.py)
        with _LOCK:
            ok = _bind() is not None and _self_check(E, I, H, K, T)
            _STATE["checked"][key] = ok
    return ok


def _self_check(E: int, I: int, H: int, K: int, T: int) -> bool:
    """The operator against the torch path on random weights and routings, at T tokens and a few small counts."""
    from .layers import Experts

    class _Cfg:
        num_experts, hidden_size, moe_intermediate_size, top_k_experts = E, H, I, K

    ex = Experts(_Cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.05)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.05)
        for n, skew in ((T, 1.0), (T, 4.0), (1, 1.0), (3, 2.0), (17, 1.0)):
            if not layers.gelu_all_vector(n * K * I):
                continue
            x = torch.randn(n, H, generator=g)
            w, idx = torch.softmax(torch.randn(n, E, generator=g) * skew, -1).topk(min(K, E), dim=-1)
            w = w / w.sum(-1, keepdim=True)
            want = ex.torch_forward(x, w, idx)
            sorted_ids, perm = torch.sort(idx.reshape(-1))
            counts = torch.bincount(sorted_ids, minlength=E)
            try:
                got = torch.ops.dgemma.moe_experts(x, perm, counts, w, ex.gate_up_proj, ex.down_proj)
            except RuntimeError:
                return False
            if not torch.equal(got, want):
                return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# transpose_div, and the layer's norms
# ---------------------------------------------------------------------------------------------------------------
def _transpose_div(x, d):
    lib = _lib()
    if not (_all_f32(x) and x.dim() == 2):
        raise RuntimeError("dgemma::transpose_div takes a 2-D CPU float32 tensor")
    x = x.contiguous()
    V, N = x.shape
    out = torch.empty(N, V, dtype=_F32)
    lib.dg_transpose_div(x.data_ptr(), V, N, d, out.data_ptr(), torch.get_num_threads())
    return out


def _rows_ok(D: int, *vectors: torch.Tensor) -> bool:
    return norm_size_ok(D) and all(v.numel() == D for v in vectors)


def _pre_ffn(x, o, w_pa, w_pre, w_pre2, scale, root, eps):
    lib = _lib()
    D = x.shape[-1]
    if not (_rows_ok(D, w_pa, w_pre, w_pre2, scale) and o.shape == x.shape
            and _all_f32(x, o, w_pa, w_pre, w_pre2, scale)):
        raise RuntimeError("dgemma::pre_ffn: float32 rows of a multiple of 32 up to 512, weights of that size")
    x, o = x.contiguous(), o.contiguous()
    w_pa, w_pre, w_pre2, scale = w_pa.contiguous(), w_pre.contiguous(), w_pre2.contiguous(), scale.contiguous()
    outs = [torch.empty(x.shape, dtype=_F32) for _ in range(4)]
    lib.dg_pre_ffn(x.data_ptr(), o.data_ptr(), x.numel() // D, D, w_pa.data_ptr(), w_pre.data_ptr(),
                   w_pre2.data_ptr(), scale.data_ptr(), root, eps, *[t.data_ptr() for t in outs])
    return tuple(outs)


def _ffn_tail(x, h1, h2, w1, w2, w, scalar, eps):
    lib = _lib()
    D = x.shape[-1]
    if not (_rows_ok(D, w1, w2, w) and h1.shape == x.shape and h2.shape == x.shape and scalar.numel() == 1
            and _all_f32(x, h1, h2, w1, w2, w, scalar)):
        raise RuntimeError("dgemma::ffn_tail: float32 rows of a multiple of 32 up to 512, weights of that size")
    x, h1, h2, scalar = x.contiguous(), h1.contiguous(), h2.contiguous(), scalar.contiguous()
    w1, w2, w = w1.contiguous(), w2.contiguous(), w.contiguous()
    out = torch.empty(x.shape, dtype=_F32)
    lib.dg_ffn_tail(x.data_ptr(), h1.data_ptr(), h2.data_ptr(), x.numel() // D, D, w1.data_ptr(), w2.data_ptr(),
                    w.data_ptr(), scalar.data_ptr(), eps, out.data_ptr())
    return out


def _qkv_post(q, k, v, cos, sin, wq, wk, nh, g, eps):
    lib = _lib()
    d = q.shape[-1] // nh if nh > 0 else 0
    if not (q.dim() == 3 and k.dim() == 3 and tuple(k.shape[:2]) == tuple(q.shape[:2]) and q.shape[-1] == nh * d
            and k.shape[-1] == g * d and _rows_ok(d, wq, wk) and cos.dim() == 2
            and tuple(cos.shape) == (q.shape[1], d) and sin.shape == cos.shape
            and (v is None or (v.shape == k.shape and _all_f32(v))) and _all_f32(q, k, cos, sin, wq, wk)):
        raise RuntimeError("dgemma::qkv_post: q [B, S, nh*d], k (and v) [B, S, g*d], cos/sin [S, d], float32, "
                           "d a multiple of 32 up to 512")
    B, S = q.shape[0], q.shape[1]
    q, k, cos, sin, wq, wk = q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous(), wq.contiguous(), \
        wk.contiguous()
    v = v.contiguous() if v is not None else None
    qo = torch.empty(B, S, nh, d, dtype=_F32)
    ko = torch.empty(B, S, g, d, dtype=_F32)
    vo = torch.empty(B, S, g, d, dtype=_F32)
    lib.dg_qkv_post(q.data_ptr(), k.data_ptr(), v.data_ptr() if v is not None else None, B * S, S, nh, g, d,
                    cos.data_ptr(), sin.data_ptr(), wq.data_ptr(), wk.data_ptr(), eps, qo.data_ptr(), ko.data_ptr(),
                    vo.data_ptr())
    return qo, ko, vo


def _ready(x: torch.Tensor) -> bool:
    """Inside the trace's native variant, on a CPU fp32 tensor without gradients, with the library built?"""
    return (layers.native_active() and x.device.type == "cpu" and x.dtype == _F32 and not torch.is_grad_enabled()
            and (_STATE.get("fn") or _bind()) is not None)


def layer_glue_usable(x: torch.Tensor, D: int) -> bool:
    """Can the norm operators (`qkv_post`, `pre_ffn`, `ffn_tail`) stand in for torch's on x with rows of D (an int:
    while tracing, x's sizes are tensors)?"""
    return norm_size_ok(D) and _ready(x)


def transpose_usable(x: torch.Tensor) -> bool:
    """Can `transpose_div` bring the weight-first head product back? Its numbers are a copy and one IEEE division,
    the same as torch's; the trace check confirms it as for the rest."""
    return _ready(x)


def _kernel(name: str):
    """The registered kernel looks its implementation up at call time (so tests can stand in for one)."""
    return lambda *args: globals()[name](*args)


_LIB = torch.library.Library("dgemma", "DEF")
for _schema, _impl in (
        ("moe_experts(Tensor x, Tensor perm, Tensor counts, Tensor weights, Tensor gate_up, Tensor down) -> Tensor",
         "_moe_experts"),
        ("transpose_div(Tensor x, float d) -> Tensor", "_transpose_div"),  # out[n, v] = x[v, n] / d
        ("pre_ffn(Tensor x, Tensor o, Tensor w_pa, Tensor w_pre, Tensor w_pre2, Tensor scale, float root, float eps)"
         " -> (Tensor, Tensor, Tensor, Tensor)", "_pre_ffn"),
        ("ffn_tail(Tensor x, Tensor h1, Tensor h2, Tensor w1, Tensor w2, Tensor w, Tensor scalar, float eps)"
         " -> Tensor", "_ffn_tail"),
        ("qkv_post(Tensor q, Tensor k, Tensor? v, Tensor cos, Tensor sin, Tensor wq, Tensor wk, int nh, int g,"
         " float eps) -> (Tensor, Tensor, Tensor)", "_qkv_post")):
    _LIB.define(_schema)
    _LIB.impl(_schema.split("(", 1)[0], _kernel(_impl), "CPU")
