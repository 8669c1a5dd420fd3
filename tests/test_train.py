"""Training: the uniform-state diffusion objective (spec §6.1), SFT data, LoRA, the trainer (resume, metrics,
checkpoints), `dgemma train` and a 2-process DDP smoke run — all on the random `tiny` preset, on CPU."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import dgemma
from dgemma import cli
from dgemma.errors import DGemmaError
from dgemma.presets import init_checkpoint
from dgemma.train import (Batch, DataError, DiffusionObjective, Example, ObjectiveConfig, TrainConfig, apply_lora,
                          collate, corrupt, load_jsonl, merge_lora, train)
from dgemma.train import objective as objective_mod
from dgemma.train import trainer as trainer_mod
from dgemma.train.lora import TARGETS, LoRALinear, export_state, lora_state
from dgemma.train.objective import denoise_at, encode_clean

L = 16  # tiny preset canvas length
W = 32  # tiny preset sliding window
V = 1024  # tiny preset vocabulary


# --------------------------------------------------------------------------------------------------------------
# fixtures and helpers
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return init_checkpoint("tiny", tmp_path_factory.mktemp("train") / "tiny")


@pytest.fixture
def model(ckpt):
    """A fresh fp32 copy per test (tests mutate it: LoRA wrapping, requires_grad)."""
    return dgemma.load(ckpt, dtype=torch.float32, device="cpu")


def _arith_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return out


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("data") / "arith.jsonl", _arith_records(100))


def _cfg(ckpt, data, out, **kw) -> TrainConfig:
    base = dict(model=str(ckpt), data=str(data), out=str(out), steps=4, batch_size=4, lr=1e-3, warmup_steps=2,
                log_every=2, save_every=100, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in dgemma.load(path, dtype=torch.float32, device="cpu")
            .backbone.named_parameters()}


def _batch(rows: list[tuple[list[int], list[int], int]], pad: int = 0) -> Batch:
    """rows of (prompt, response, k): a right-padded Batch with canvas k of each response chosen."""
    S = max(len(p) + len(r) for p, r, _ in rows)
    B = len(rows)
    ids = torch.full((B, S), pad, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    start = torch.zeros(B, dtype=torch.long)
    sup = torch.zeros(B, L, dtype=torch.bool)
    canvas = torch.full((B, L), pad, dtype=torch.long)
    response = torch.zeros(B, S, dtype=torch.bool)
    for b, (p, r, k) in enumerate(rows):
        seq = p + r
        ids[b, :len(seq)] = torch.tensor(seq)
        valid[b, :len(seq)] = True
        response[b, len(p):len(seq)] = True
        chunk = r[k * L:(k + 1) * L]
        assert chunk, "canvas k must hold response tokens"
        start[b] = len(p) + k * L
        canvas[b, :len(chunk)] = torch.tensor(chunk)
        sup[b, :len(chunk)] = True
    return Batch(ids, valid, start, sup, canvas, response)


def _toks(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n,), generator=g).tolist()


def _mixed_batch() -> Batch:
    """Rows: a prefix longer than the sliding window (later canvas), a short right-padded row, a row whose chosen
    canvas is the partial last one, and a start beyond the window at k = 0."""
    return _batch([
        ([2] + _toks(39, 1), _toks(30, 2), 1),  # prefix 40 + 16 = 56 > W
        ([2] + _toks(4, 3), _toks(3, 4), 0),  # short, heavily right-padded, partial canvas
        ([2] + _toks(9, 5), _toks(20, 6), 1),  # last canvas holds 4 tokens
        ([2] + _toks(44, 7), _toks(16, 8), 0),  # start 45 > W, full canvas
    ])


def _reference_row(bb, ids_row: torch.Tensor, P: int, canvas_row: torch.Tensor, sc=None) -> torch.Tensor:
    """The inference path: Backbone.encode of the clean prefix into a fresh cache, then Backbone.denoise."""
    cache = bb.new_cache(1, max(P, 1))
    bb.encode(ids_row[None, :P], cache)
    return bb.denoise(canvas_row[None], cache, sc)


# --------------------------------------------------------------------------------------------------------------
# 1. corruption
def test_corrupt_rate_matches_t_and_padding_never_changes():
    g = torch.Generator().manual_seed(0)
    B, Lc = 2000, 128
    canvas = torch.randint(0, V, (B, Lc), generator=g)
    sup = torch.rand(B, Lc, generator=g) < 0.8  # ~205k supervised positions, ~51k "padding"
    n_sup = int(sup.sum())
    assert n_sup > 200_000
    for t_val in (0.3, 0.7):
        t = torch.full((B,), t_val)
        noisy, mask = corrupt(canvas, sup, t, V, g)
        assert mask.dtype == torch.bool and noisy.shape == canvas.shape
        assert not (mask & ~sup).any(), "a padding position was selected for corruption"
        assert torch.equal(noisy[~sup], canvas[~sup]), "a padding position changed"
        assert torch.equal(noisy[~mask], canvas[~mask]), "an unselected position changed"
        frac = float(mask.sum()) / n_sup
        assert abs(frac - t_val) < 0.01, (t_val, frac)
        changed = float((noisy != canvas)[sup].sum()) / n_sup
        assert abs(changed - t_val * (1 - 1 / V)) < 0.01
    # t -> 0: (almost) nothing corrupted
    noisy, mask = corrupt(canvas, sup, torch.full((B,), 1e-3), V, g)
    assert float(mask.sum()) / n_sup < 2e-3
    assert torch.equal(noisy[~sup], canvas[~sup])


def test_corrupt_t1_selects_every_supervised_position_with_uniform_noise():
    g = torch.Generator().manual_seed(1)
    B, Lc, v = 4000, 50, 4  # a small vocabulary: a selected position keeps its own token 1/v of the time
    canvas = torch.randint(0, v, (B, Lc), generator=g)
    sup = torch.rand(B, Lc, generator=g) < 0.75
    noisy, mask = corrupt(canvas, sup, torch.ones(B), v, g)
    assert torch.equal(mask, sup), "with t = 1 every supervised position (and only those) must be selected"
    assert torch.equal(noisy[~sup], canvas[~sup])
    changed = float((noisy != canvas)[sup].float().mean())
    assert abs(changed - (1 - 1 / v)) < 0.01, changed
    # the replacement tokens are uniform over the whole vocabulary
    counts = torch.bincount(noisy[sup], minlength=v).float()
    assert counts.numel() == v
    assert float((counts / counts.sum() - 1 / v).abs().max()) < 0.01
    assert int(noisy.min()) >= 0 and int(noisy.max()) < v


def test_corrupt_respects_per_example_t():
    g = torch.Generator().manual_seed(2)
    ts = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    reps = 400  # the last `reps` positions of every row are padding
    B, Lc = len(ts), 20_000
    canvas = torch.randint(0, V, (B, Lc), generator=g)
    sup = torch.ones(B, Lc, dtype=torch.bool)
    sup[:, -reps:] = False
    noisy, mask = corrupt(canvas, sup, ts, V, g)
    for b, t_val in enumerate(ts.tolist()):
        frac = float(mask[b].sum()) / float(sup[b].sum())
        assert abs(frac - t_val) < 0.012, (b, t_val, frac)
    assert not mask[0].any() and torch.equal(noisy[0], canvas[0])
    assert torch.equal(mask[4], sup[4])
    assert torch.equal(noisy[:, -reps:], canvas[:, -reps:])


# --------------------------------------------------------------------------------------------------------------
# 2. the loss
def _seeded_forward(obj, batch, seed):
    return obj(batch, torch.Generator().manual_seed(seed))


def test_diffusion_loss_ignores_unsupervised_targets_and_logits(model, monkeypatch):
    bb = model.backbone
    batch = _mixed_batch()
    sup = batch.supervised
    assert (~sup).any()
    obj = DiffusionObjective(bb, ObjectiveConfig(ar_weight=0.0))
    real = objective_mod.denoise_at
    state = {"perturb": None}

    def fake(bb_, canvas, start, kvs, valid, sc=None, sc_mask=None, span=None):
        # keep the decoder *input* at unsupervised positions fixed (it legitimately influences every position
        # through bidirectional attention); only the targets and the scored logits there are varied
        z = real(bb_, torch.where(sup, canvas, batch.canvas), start, kvs, valid, sc, sc_mask, span)
        if state["perturb"] is not None and torch.is_grad_enabled():  # pass 2 only
            z = torch.where(state["perturb"][0][..., None], state["perturb"][1], z)
        return z

    monkeypatch.setattr(objective_mod, "denoise_at", fake)
    base = _seeded_forward(obj, batch, 11)
    assert set(base) >= {"loss", "diffusion_loss", "canvas_accuracy"} and "ar_loss" not in base
    assert torch.equal(base["loss"], base["diffusion_loss"]), "ar_weight=0: the loss is the diffusion loss"

    g = torch.Generator().manual_seed(5)
    junk = 40 * torch.randn(*sup.shape, V, generator=g)
    other_targets = torch.where(sup, batch.canvas, torch.randint(3, V, sup.shape, generator=g))
    changed = dataclasses.replace(batch, canvas=other_targets)
    state["perturb"] = (~sup, junk)
    out = _seeded_forward(obj, changed, 11)
    torch.testing.assert_close(out["diffusion_loss"], base["diffusion_loss"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["canvas_accuracy"], base["canvas_accuracy"])

    # and the check discriminates: junk at one supervised position does change the loss
    one = torch.zeros_like(sup)
    one[0, 0] = True
    state["perturb"] = (one, junk)
    out = _seeded_forward(obj, batch, 11)
    assert abs(float(out["diffusion_loss"]) - float(base["diffusion_loss"])) > 1e-3


def _reference_losses(bb, batch: Batch, cfg: ObjectiveConfig, seed: int):
    """The §6.1 objective computed independently: same RNG order (t, corruption, SC choice), inference-path
    encode/denoise per row, log-softmax CE."""
    g = torch.Generator().manual_seed(seed)
    B = batch.ids.shape[0]
    t = cfg.t_lo + (1 - cfg.t_lo) * torch.rand(B, generator=g)
    noisy, _ = corrupt(batch.canvas, batch.supervised, t, V, g)
    use_sc = torch.rand(B, generator=g) < cfg.sc_prob
    num, n_sup, ar_sum, ar_n = 0.0, 0, 0.0, 0
    for b in range(B):
        P = int(batch.canvas_start[b])
        z1 = _reference_row(bb, batch.ids[b], P, noisy[b])
        sc = bb.soft_embed(z1) if bool(use_sc[b]) else None
        z2 = _reference_row(bb, batch.ids[b], P, noisy[b], sc)[0]
        ce = -torch.log_softmax(z2.double(), -1)[torch.arange(L), batch.canvas[b]]
        s = batch.supervised[b]
        w = 1.0
        if cfg.weighting == "inv_1mt":
            w = min(1.0 / (1.0 - float(t[b])), cfg.max_weight)
        num += w * float(ce[s].sum())
        n_sup += int(s.sum())
        n = int(batch.valid[b].sum())
        cache = bb.new_cache(1, n)
        h = bb.encode(batch.ids[b:b + 1, :n], cache)
        lg = bb.logits(h)[0, :-1].double()
        ar_sum += float(-torch.log_softmax(lg, -1)[torch.arange(n - 1), batch.ids[b, 1:n]].sum())
        ar_n += n - 1
    return num / n_sup, ar_sum / ar_n, use_sc


@pytest.mark.parametrize("weighting", ["none", "inv_1mt"])
def test_loss_equals_independent_cross_entropy(model, weighting):
    bb = model.backbone
    with torch.no_grad():  # the random model barely listens to its SC signal: make it matter for this check
        bb.self_conditioning.down_proj.weight.mul_(50)
    batch = _mixed_batch()
    cfg = ObjectiveConfig(sc_prob=0.5, ar_weight=0.7, weighting=weighting, max_weight=3.0)
    seed = next(s for s in range(100)  # a seed whose SC draw mixes rows with and without the signal
                if 0 < int(_reference_sc_draw(batch, cfg, s).sum()) < batch.ids.shape[0])
    with torch.no_grad():
        diff, ar, use_sc = _reference_losses(bb, batch, cfg, seed)
        out = DiffusionObjective(bb, cfg)(batch, torch.Generator().manual_seed(seed))
    assert use_sc.any() and (~use_sc).any()
    assert abs(float(out["diffusion_loss"]) - diff) < 1e-5 * max(1.0, diff)
    assert abs(float(out["ar_loss"]) - ar) < 1e-5 * max(1.0, ar)
    assert abs(float(out["loss"]) - (diff + 0.7 * ar)) < 1e-5 * max(1.0, diff + ar)
    # the self-conditioning choice matters at this tolerance (all rows with, or all without, the signal)
    for sc_prob in (0.0, 1.0):
        other, _, _ = _reference_losses(bb, batch, dataclasses.replace(cfg, sc_prob=sc_prob), seed)
        assert abs(other - diff) > 1e-3 * max(1.0, diff)


def test_prefix_only_batch_keeps_the_diffusion_loss_and_its_gradients(model):
    """Without the encoder's next-token loss the trainer drops the columns after the latest chosen canvas: the
    loss and every gradient must be the ones of the full batch."""
    bb = model.backbone
    bb.requires_grad_(True)
    batch = _mixed_batch()
    short = batch.prefix_only()
    keep = int(batch.canvas_start.max())
    assert short.ids.shape[1] == keep < batch.ids.shape[1]
    assert torch.equal(short.ids, batch.ids[:, :keep]) and torch.equal(short.valid, batch.valid[:, :keep])
    cfg = ObjectiveConfig(sc_prob=0.5, ar_weight=0.0)
    grads = []
    for b in (batch, short):
        bb.zero_grad(set_to_none=True)
        out = DiffusionObjective(bb, cfg)(b, torch.Generator().manual_seed(3))
        out["loss"].backward()
        grads.append((float(out["loss"]), {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}))
    (full_loss, full_g), (short_loss, short_g) = grads
    assert abs(full_loss - short_loss) < 1e-5 * max(1.0, full_loss)
    assert full_g.keys() == short_g.keys() and len(full_g) > 10
    for n in full_g:  # summation order differs (fewer tokens per expert): compare relative to the gradient's norm
        err = float((short_g[n] - full_g[n]).norm() / full_g[n].norm().clamp_min(1e-12))
        assert err < 1e-4, f"{n}: relative gradient difference {err:.2e}"
    one = _batch([([2] + _toks(9, 5), _toks(8, 6), 0)])  # one row: exactly its prompt is kept
    assert one.prefix_only().ids.shape == (1, 10) and one.ids.shape == (1, 18)


def _reference_sc_draw(batch, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    B = batch.ids.shape[0]
    t = cfg.t_lo + (1 - cfg.t_lo) * torch.rand(B, generator=g)
    corrupt(batch.canvas, batch.supervised, t, V, g)
    return torch.rand(B, generator=g) < cfg.sc_prob


def test_unknown_weighting_is_rejected(model):
    with pytest.raises(ValueError, match="unknown loss weighting 'bogus'"):
        DiffusionObjective(model.backbone, ObjectiveConfig(weighting="bogus"))(_mixed_batch())


def test_ar_mode_is_next_token_loss_on_response_only(model):
    """The autoregressive baseline (`mode="ar"`): CE of the causal encoder's next-token logits, targets = the
    response tokens only (prompt and padding unscored), checked against inference's `Backbone.encode`."""
    bb = model.backbone
    batch = _mixed_batch()
    with torch.no_grad():
        out = DiffusionObjective(bb, ObjectiveConfig(mode="ar"))(batch)
        tot, n_tgt, hits = 0.0, 0, 0
        for b in range(4):
            n = int(batch.valid[b].sum())
            cache = bb.new_cache(1, n)
            lg = bb.logits(bb.encode(batch.ids[b:b + 1, :n], cache))[0, :-1].double()
            p0 = int(batch.response[b].nonzero()[0])  # first response token
            ce = -torch.log_softmax(lg, -1)[torch.arange(n - 1), batch.ids[b, 1:n]]
            tot += float(ce[p0 - 1:].sum())
            n_tgt += n - p0
            hits += int((lg.argmax(-1)[p0 - 1:] == batch.ids[b, p0:n]).sum())
    assert "diffusion_loss" not in out
    assert abs(float(out["loss"]) - tot / n_tgt) < 1e-4 * max(1.0, tot / n_tgt)
    assert torch.equal(out["loss"], out["ar_loss"])
    assert abs(float(out["canvas_accuracy"]) - hits / n_tgt) < 1e-6


def test_two_pass_self_conditioning_and_gradients_through_encoder_kv(model, monkeypatch):
    """Pass 1 runs without gradients and without a signal; pass 2 gets the signal (masked per row) and its loss
    backpropagates into the encoder's KV of the visible clean prefix, never into keys at or after the canvas."""
    bb = model.backbone
    bb.requires_grad_(True)
    batch = _mixed_batch()
    calls, kv_store = [], {}
    real_dn, real_enc = objective_mod.denoise_at, objective_mod.encode_clean

    def spy_dn(bb_, canvas, start, kvs, valid, sc=None, sc_mask=None, span=None):
        calls.append((torch.is_grad_enabled(), sc is None, None if sc_mask is None else sc_mask.clone()))
        return real_dn(bb_, canvas, start, kvs, valid, sc, sc_mask, span)

    def spy_enc(bb_, ids, valid):
        h, kvs = real_enc(bb_, ids, valid)
        for k, v in kvs:
            k.retain_grad()
        kv_store["kvs"] = kvs
        return h, kvs

    monkeypatch.setattr(objective_mod, "denoise_at", spy_dn)
    monkeypatch.setattr(objective_mod, "encode_clean", spy_enc)
    out = DiffusionObjective(bb, ObjectiveConfig(ar_weight=0.0, sc_prob=0.5))(batch, torch.Generator().manual_seed(3))
    assert len(calls) == 2
    assert calls[0][:2] == (False, True), "pass 1: no gradients, no self-conditioning signal"
    assert calls[1][0] is True and calls[1][1] is False and calls[1][2] is not None
    assert calls[1][2].dtype == torch.bool and calls[1][2].shape == (4,)
    out["loss"].backward()
    start = batch.canvas_start
    for li, (k, _) in enumerate(kv_store["kvs"]):
        grad = k.grad.abs().sum(dim=(1, 3))  # [B, S]
        sliding = bb.cfg.layer_types[li] == "sliding_attention"
        for b in range(4):
            P = int(start[b])
            lo = max(0, P - (W - 1)) if sliding else 0
            assert float(grad[b, lo:P].min()) > 0, (li, b, "visible prefix key got no gradient")
            assert float(grad[b, P:].max()) == 0, (li, b, "a key at/after the canvas got gradient")


# --------------------------------------------------------------------------------------------------------------
# 3. self-conditioning mask
def test_sc_mask_false_rows_equal_no_signal(model):
    bb = model.backbone
    batch = _mixed_batch()
    g = torch.Generator().manual_seed(4)
    noisy = torch.randint(3, V, batch.canvas.shape, generator=g)
    with torch.no_grad():
        _, kvs = encode_clean(bb, batch.ids, batch.valid)
        sc = bb.soft_embed(3 * torch.randn(4, L, V, generator=g))
        none = denoise_at(bb, noisy, batch.canvas_start, kvs, batch.valid)
        mask = torch.tensor([True, False, True, False])
        masked = denoise_at(bb, noisy, batch.canvas_start, kvs, batch.valid, sc, mask)
        full = denoise_at(bb, noisy, batch.canvas_start, kvs, batch.valid, sc)
    assert none.dtype == torch.float32 and none.shape == (4, L, V)
    assert torch.equal(masked[~mask], none[~mask]), "a masked row must be exactly the no-signal pass"
    for b in (0, 2):
        assert float((masked[b] - none[b]).abs().max()) > 0.1, "the signal must reach unmasked rows"
        torch.testing.assert_close(masked[b], full[b], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# 4. consistency with inference
# fp32 noise floor of the tiny preset: its logits are ~25 in magnitude and the net is sensitive (a 1e-7 relative
# perturbation of the weights moves them by ~2e-4; inference itself moves them by up to ~1e-4 when the same prefix
# is encoded in two chunks instead of one). Reducing over extra *masked* keys (right padding, a longer training
# sequence) changes fp32 summation order by that much, so the padded-batch comparison uses 1e-3 — a real position,
# window or mask bug moves these logits by 20–40 — and the ≤1e-5 check is made where the shapes coincide.
PAD_TOL = 1e-3


def test_training_passes_match_inference_exactly_for_same_shapes(model):
    bb = model.backbone
    batch = _mixed_batch()
    noisy = torch.randint(3, V, batch.canvas.shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for b in range(4):
            P = int(batch.canvas_start[b])
            ids, valid = batch.ids[b:b + 1, :P], batch.valid[b:b + 1, :P]
            _, kvs = encode_clean(bb, ids, valid)
            z = denoise_at(bb, noisy[b:b + 1], batch.canvas_start[b:b + 1], kvs, valid)
            ref = _reference_row(bb, batch.ids[b], P, noisy[b])
            torch.testing.assert_close(z, ref, rtol=0, atol=1e-5)


def test_training_passes_match_inference_encode_denoise(model):
    bb = model.backbone
    batch = _mixed_batch()
    assert int(batch.canvas_start[0]) > W and int(batch.canvas_start[3]) > W and not batch.valid[1].all()
    g = torch.Generator().manual_seed(6)
    noisy = torch.randint(3, V, batch.canvas.shape, generator=g)
    sc = bb.soft_embed(3 * torch.randn(4, L, V, generator=g))
    mask = torch.tensor([True, True, False, True])
    with torch.no_grad():
        h, kvs = encode_clean(bb, batch.ids, batch.valid)
        z_plain = denoise_at(bb, noisy, batch.canvas_start, kvs, batch.valid)
        z_sc = denoise_at(bb, noisy, batch.canvas_start, kvs, batch.valid, sc, mask)
        enc_logits = bb.logits(h)
        for b in range(4):
            P = int(batch.canvas_start[b])
            ref = _reference_row(bb, batch.ids[b], P, noisy[b])[0]
            torch.testing.assert_close(z_plain[b], ref, rtol=0, atol=PAD_TOL)
            ref_sc = _reference_row(bb, batch.ids[b], P, noisy[b], sc[b:b + 1] if mask[b] else None)[0]
            torch.testing.assert_close(z_sc[b], ref_sc, rtol=0, atol=PAD_TOL)
            # the encoder pass over the whole clean sequence equals inference's causal encode
            n = int(batch.valid[b].sum())
            cache = bb.new_cache(1, n)
            ref_h = bb.encode(batch.ids[b:b + 1, :n], cache)
            torch.testing.assert_close(enc_logits[b, :n], bb.logits(ref_h)[0], rtol=0, atol=PAD_TOL)
        # the tolerance is far below what a real bug does: one position off, or a sliding window one too wide
        off = denoise_at(bb, noisy, batch.canvas_start + 1, kvs, batch.valid)
        assert float((off - z_plain).abs().amax(dim=(1, 2)).min()) > 1.0
        bb.cfg.sliding_window += 1
        try:
            wide = denoise_at(bb, noisy, batch.canvas_start, kvs, batch.valid)
        finally:
            bb.cfg.sliding_window -= 1
        assert float((wide - z_plain)[[0, 3]].abs().amax(dim=(1, 2)).min()) > 1.0


# --------------------------------------------------------------------------------------------------------------
# 5. collate
def test_collate_layout_and_supervision():
    lens = [(3, 1), (5, 16), (4, 17), (2, 32), (7, 33), (6, 40)]
    examples = [Example(_toks(p, 10 + i), _toks(r, 20 + i)) for i, (p, r) in enumerate(lens)]
    g = torch.Generator().manual_seed(0)
    seen_k: dict[int, set] = {i: set() for i in range(len(examples))}
    for _ in range(200):
        batch = collate(examples, L, 0, g)
        S = max(p + r for p, r in lens)
        assert batch.ids.shape == (len(examples), S) and batch.canvas.shape == (len(examples), L)
        for b, e in enumerate(examples):
            seq = e.prompt + e.response
            assert batch.ids[b, :len(seq)].tolist() == seq and bool(batch.valid[b, :len(seq)].all())
            assert not batch.valid[b, len(seq):].any() and (batch.ids[b, len(seq):] == 0).all()
            assert batch.response[b].tolist() == [False] * len(e.prompt) + [True] * len(e.response) \
                + [False] * (S - len(seq))
            off = int(batch.canvas_start[b]) - len(e.prompt)
            assert off >= 0 and off % L == 0
            k = off // L
            assert k < math.ceil(len(e.response) / L), "chosen canvas holds no response token"
            n = min(L, len(e.response) - k * L)
            assert batch.supervised[b].tolist() == [True] * n + [False] * (L - n)
            assert batch.canvas[b, :n].tolist() == e.response[k * L:k * L + n]
            assert batch.canvas[b, :n].tolist() == batch.ids[b, off + len(e.prompt):off + len(e.prompt) + n].tolist()
            assert (batch.canvas[b, n:] == 0).all()
            seen_k[b].add(k)
    assert [sorted(seen_k[b]) for b in range(len(examples))] == [[0], [0], [0, 1], [0, 1], [0, 1, 2], [0, 1, 2]]


def test_collate_canvas_choice_is_uniform_and_seeded():
    ex = Example([2, 5, 6], _toks(10 * L - 3, 0))  # 10 canvases, the last one partial
    g = torch.Generator().manual_seed(1)
    ks = []
    for _ in range(10):
        batch = collate([ex] * 300, L, 0, g)
        ks += ((batch.canvas_start - 3) // L).tolist()
    counts = torch.bincount(torch.tensor(ks), minlength=10).float()
    assert counts.numel() == 10
    expected = len(ks) / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30, (counts.tolist(), chi2)  # 9 dof: P(chi2 > 30) ≈ 4e-4
    a = collate([ex] * 20, L, 0, torch.Generator().manual_seed(7))
    b = collate([ex] * 20, L, 0, torch.Generator().manual_seed(7))
    assert torch.equal(a.canvas_start, b.canvas_start) and torch.equal(a.canvas, b.canvas)


def test_collate_rejects_an_empty_response():
    with pytest.raises(DataError, match="example 1 of the batch has an empty response"):
        collate([Example([2, 5], [7, 8]), Example([2, 5, 6], [])], L, 0)


# --------------------------------------------------------------------------------------------------------------
# 6. end-to-end training, checkpoints and resume
def test_training_lowers_loss_checkpoints_generate_and_resume(ckpt, data_file, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(ckpt, data_file, out, steps=30, batch_size=8, lr=3e-3, warmup_steps=3, log_every=5, save_every=10)
    final = train(cfg, show_progress=False)
    assert final == out / "checkpoint-30"
    rows = _metrics(out)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    first, last = rows[0], rows[-1]
    assert float(last["loss"]) < 0.6 * float(first["loss"]), (first, last)
    assert float(last["diffusion_loss"]) < 0.6 * float(first["diffusion_loss"]), (first, last)
    for r in rows:
        assert math.isclose(float(r["loss"]), float(r["diffusion_loss"]) + float(r["ar_loss"]), abs_tol=2e-4)
        assert 0.0 <= float(r["canvas_accuracy"]) <= 1.0 and float(r["lr"]) <= 3e-3 * 1.0001
    # keep_checkpoints=2, the `last` marker, trainer state, the recorded config
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    assert (out / "last").read_text().strip() == "checkpoint-30"
    st = torch.load(final / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert st["step"] == 30 and st["lora"] is None and st["config"]["steps"] == 30
    assert json.loads((out / "train_config.json").read_text())["lr"] == 3e-3

    # the checkpoint is a normal dgemma checkpoint: it loads, differs from the start, and generates
    trained = dgemma.load(final, device="cpu")
    init = _state(ckpt)
    assert any(not torch.equal(p, init[n]) for n, p in trained.backbone.named_parameters())
    ids = trained.tokenizer.encode("3+4=")
    res = trained.generate(ids, max_new_tokens=L, max_denoising_steps=8, seed=0)
    assert res.sequences.shape[0] == 1 and res.sequences.shape[1] >= len(ids) + L
    assert res.sequences[0, :len(ids)].tolist() == ids

    # resume: a rerun with more steps continues from checkpoint-30 (not from scratch) and appends metrics
    final2 = train(TrainConfig(**{**cfg.__dict__, "steps": 40}), show_progress=False)
    assert final2 == out / "checkpoint-40"
    rows2 = _metrics(out)
    assert rows2[:len(rows)] == rows, "earlier metrics rows must be kept"
    new = rows2[len(rows):]
    assert [int(r["step"]) for r in new] == [35, 40]
    assert (out / "metrics.csv").read_text().count("step,") == 1, "header written twice"
    assert float(new[0]["loss"]) < 0.6 * float(first["loss"]), "the resumed run restarted from the initial weights"
    assert torch.load(final2 / "trainer_state.pt", weights_only=False)["step"] == 40
    assert (out / "last").read_text().strip() == "checkpoint-40"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-30", "checkpoint-40"]
    dgemma.load(final2, device="cpu")


def test_max_minutes_stops_saves_and_anneals_by_the_clock(ckpt, data_file, tmp_path, monkeypatch):
    # a fake clock: every reading advances 1 s, so a 0.5-minute (30 s) budget ends the run after ~15 steps
    now = [0.0]

    def fake_perf_counter():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(trainer_mod.time, "perf_counter", fake_perf_counter)
    out = tmp_path / "timed"
    final = train(_cfg(ckpt, data_file, out, steps=1000, max_minutes=0.5, log_every=1, save_every=1000,
                       min_lr_ratio=0.1, warmup_steps=1), show_progress=False)
    rows = _metrics(out)
    done = int(rows[-1]["step"])
    assert 5 <= done < 30 and final == out / f"checkpoint-{done}", (done, final)
    assert (out / "last").read_text().strip() == f"checkpoint-{done}"
    st = torch.load(final / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert st["step"] == done and st["elapsed_s"] >= 30.0 and 0 < st["warmup_s"] < 10
    # the cosine followed the clock: the last step's lr is far below the peak although step << steps
    assert float(rows[-1]["lr"]) < 0.5e-3, rows[-1]
    dgemma.load(final, device="cpu")
    # one process reads the clock every step, not only on log steps: a run logging rarely still stops on time
    now[0] = 0.0
    rare = train(_cfg(ckpt, data_file, tmp_path / "rare", steps=1000, max_minutes=0.5, log_every=500,
                      save_every=1000, warmup_steps=1), show_progress=False)
    assert 5 <= int(rare.name.split("-")[1]) < 30, rare


def test_lr_schedule_takes_the_larger_of_step_and_clock_progress():
    from dgemma.train.trainer import lr_at

    cfg = TrainConfig(model="m", data="d", steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0)
    assert lr_at(4, cfg) == pytest.approx(0.5)  # warm-up
    assert lr_at(55, cfg) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(100, cfg) == pytest.approx(0.0, abs=1e-12)
    timed = TrainConfig(model="m", data="d", steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, max_minutes=1.0)
    assert lr_at(20, timed, elapsed_s=30.0) == pytest.approx(0.5)  # clock says half-way
    assert lr_at(55, timed, elapsed_s=1.0) == pytest.approx(0.5)  # steps say half-way
    assert lr_at(20, timed, elapsed_s=60.0) == pytest.approx(0.0, abs=1e-12)
    # the clock fraction counts the time after warm-up: 10 s of warm-up, then half of the 50 s left
    assert lr_at(20, timed, elapsed_s=35.0, warmup_s=10.0) == pytest.approx(0.5)
    assert lr_at(10, timed, elapsed_s=10.0, warmup_s=10.0) == pytest.approx(1.0)  # no jump at the end of warm-up


def _subset(tmp_path: Path, n: int) -> Path:
    return _write_jsonl(tmp_path / f"d{n}.jsonl", _arith_records(n, seed=3))


def _resume_gap(ckpt, data, tmp_path) -> float:
    """max |Δw| between an uninterrupted 8-step run and a 4 + 4-step resumed run (constant lr after warm-up,
    so the schedule does not depend on `steps`)."""
    kw = dict(batch_size=4, lr=1e-3, warmup_steps=2, min_lr_ratio=1.0, log_every=2)
    a = train(_cfg(ckpt, data, tmp_path / "A", steps=8, save_every=4, **kw), show_progress=False)
    train(_cfg(ckpt, data, tmp_path / "B", steps=4, save_every=4, **kw), show_progress=False)
    b = train(_cfg(ckpt, data, tmp_path / "B", steps=8, save_every=4, **kw), show_progress=False)
    sa, sb = _state(a), _state(b)
    return max(float((sa[n] - sb[n]).abs().max()) for n in sa)


def test_resume_is_exact_at_an_epoch_boundary(ckpt, tmp_path):
    # 16 examples, batch 4: the checkpoint at step 4 falls exactly at the end of an epoch
    assert _resume_gap(ckpt, _subset(tmp_path, 16), tmp_path) == 0.0


def test_resume_mid_epoch_is_exact(ckpt, tmp_path):
    # 20 examples, batch 4: the checkpoint at step 4 leaves 4 examples of the epoch unseen
    assert _resume_gap(ckpt, _subset(tmp_path, 20), tmp_path) == 0.0


def test_first_metrics_row_after_unaligned_resume_is_a_true_mean(ckpt, data_file, tmp_path, monkeypatch):
    losses: list[float] = []

    class Spy(DiffusionObjective):
        def forward(self, batch, generator=None):
            res = super().forward(batch, generator)
            losses.append(float(res["loss"]))
            return res

    monkeypatch.setattr(trainer_mod, "DiffusionObjective", Spy)
    out = tmp_path / "run"
    train(_cfg(ckpt, data_file, out, steps=7, log_every=5, save_every=7), show_progress=False)
    losses.clear()
    train(_cfg(ckpt, data_file, out, steps=10, log_every=5, save_every=7), show_progress=False)
    rows = _metrics(out)
    assert [int(r["step"]) for r in rows] == [5, 7, 10]
    assert len(losses) == 3
    assert float(rows[-1]["loss"]) == pytest.approx(sum(losses) / 3, abs=2e-4)


def test_router_frozen_by_default_in_full_fine_tuning(ckpt, data_file, tmp_path, monkeypatch):
    made = []

    class Spy(DiffusionObjective):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(trainer_mod, "DiffusionObjective", Spy)
    init = _state(ckpt)
    for freeze in (True, False):
        out = tmp_path / f"freeze{freeze}"
        final = train(_cfg(ckpt, data_file, out, steps=2, lr=1e-2, freeze_router=freeze), show_progress=False)
        bb = made[-1].backbone
        router = {n: p for n, p in bb.named_parameters() if ".router." in n}
        assert len(router) == 3 * bb.cfg.num_hidden_layers
        assert all(p.requires_grad != freeze for p in router.values())
        assert all(p.requires_grad for n, p in bb.named_parameters() if ".router." not in n)
        saved = _state(final)
        assert all(torch.equal(saved[n], init[n]) != (not freeze) for n in router), f"freeze_router={freeze}"
        assert not torch.equal(saved["layers.0.self_attn.q_proj.weight"], init["layers.0.self_attn.q_proj.weight"])


# --------------------------------------------------------------------------------------------------------------
# 7. DDP (2 processes, gloo on CPU)
DDP_DRIVER = textwrap.dedent("""
    # runs `python -m dgemma ...` exactly, after wrapping the trainer's _save to dump each rank's weights and RNG
    import os, runpy, sys
    import torch
    import dgemma.train.trainer as T

    orig = T._save
    def spy(model, bb, opt, rank_state, step, out, cfg, rank, *rest):
        state = {n: p.detach().clone() for n, p in bb.named_parameters()}
        torch.save({"params": state, "gen": rank_state["gen"]},
                   os.path.join(os.environ["SPY_DIR"], f"rank{rank}-step{step}.pt"))
        return orig(model, bb, opt, rank_state, step, out, cfg, rank, *rest)
    T._save = spy
    runpy.run_module("dgemma", run_name="__main__", alter_sys=True)
""")


def _torchrun(driver: Path, spy: Path, ckpt, data, out: Path, steps: int) -> subprocess.CompletedProcess:
    spy.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPY_DIR": str(spy)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), "train", "--model", str(ckpt), "--data", str(data), "--out", str(out),
           "--steps", str(steps), "--batch-size", "2", "--set", "log_every=2", "--set", "save_every=4", "-q"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ddp_run(ckpt, data_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    driver = d / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    proc = _torchrun(driver, d / "spy", ckpt, data_file, d / "out", steps=4)
    return d, proc


def test_ddp_two_process_cpu_smoke(ckpt, ddp_run):
    d, proc = ddp_run
    out, spy = d / "out", d / "spy"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained checkpoint" in proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert [int(r["step"]) for r in _metrics(out)] == [2, 4]
    saved = _state(out / "checkpoint-4")
    init = _state(ckpt)
    assert any(not torch.equal(saved[n], init[n]) for n in saved), "DDP run did not change the weights"
    # both ranks hold identical weights after 4 steps on different data shards and RNG streams: the gradients
    # were all-reduced (without DDP the ranks would drift apart); and rank 0's copy is what was saved
    r0, r1 = torch.load(spy / "rank0-step4.pt"), torch.load(spy / "rank1-step4.pt")
    assert r0["params"].keys() == r1["params"].keys() == saved.keys()
    for n in saved:
        assert torch.equal(r0["params"][n], r1["params"][n]), f"ranks diverged at {n}"
        assert torch.equal(saved[n], r0["params"][n])
    assert not torch.equal(r0["gen"], r1["gen"]), "ranks must draw different t / corruption / SC choices"


def test_ddp_resume_keeps_per_rank_rng_streams(ckpt, data_file, ddp_run, tmp_path):
    d, proc = ddp_run
    assert proc.returncode == 0
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    res = _torchrun(d / "ddp_driver.py", tmp_path / "spy", ckpt, data_file, out, steps=6)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [int(r["step"]) for r in _metrics(out)] == [2, 4, 6]
    r0, r1 = torch.load(tmp_path / "spy" / "rank0-step6.pt"), torch.load(tmp_path / "spy" / "rank1-step6.pt")
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n])
    assert not torch.equal(r0["gen"], r1["gen"]), "after resume both ranks share one RNG stream"


# --------------------------------------------------------------------------------------------------------------
# 8. LoRA
def test_apply_lora_starts_unchanged_merges_and_exports(model):
    bb = model.backbone
    batch = _mixed_batch()
    noisy = torch.randint(3, V, batch.canvas.shape, generator=torch.Generator().manual_seed(8))
    names_before = {n for n, _ in bb.named_parameters()} | {n for n, _ in bb.named_buffers()}

    def logits():
        with torch.no_grad():
            _, kvs = encode_clean(bb, batch.ids, batch.valid)
            return denoise_at(bb, noisy, batch.canvas_start, kvs, batch.valid)

    before = logits()
    bb.requires_grad_(True)
    wrapped = apply_lora(bb, rank=4, alpha=8.0)
    n_layers = bb.cfg.num_hidden_layers
    n_full = sum(bb.cfg.is_full(i) for i in range(n_layers))
    assert len(wrapped) == n_layers * len(TARGETS) - n_full  # full layers have no v_proj
    assert not any("experts" in w or "router" in w for w in wrapped)
    assert all(isinstance(m, LoRALinear) for n, m in bb.named_modules() if n in wrapped)
    trainable = [(n, p) for n, p in bb.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(wrapped) and all(".lora_" in n for n, _ in trainable)
    assert {tuple(p.shape)[0 if "lora_A" in n else 1] for n, p in trainable} == {4}
    assert torch.equal(logits(), before), "LoRA with B = 0 must leave the model unchanged"

    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    lora_out = logits()
    assert float((lora_out - before).abs().max()) > 100 * PAD_TOL
    # each wrapped linear: LoRALinear(x) == x (W + B·A·alpha/r)ᵀ, checked by hand
    for w in wrapped:
        mod = bb.get_submodule(w)
        x = torch.randn(5, mod.base.in_features, generator=g)
        by_hand = x @ (mod.base.weight + (mod.lora_B @ mod.lora_A) * (8.0 / 4)).t()
        with torch.no_grad():
            torch.testing.assert_close(mod(x), by_hand, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mod.weight, mod.base.weight + (mod.lora_B @ mod.lora_A) * 2.0)

    exported = export_state(bb)
    assert set(exported) == names_before, "export_state must use the checkpoint names only"
    merge_lora(bb)
    assert not any(isinstance(m, LoRALinear) for m in bb.modules())
    for w in wrapped:
        assert type(bb.get_submodule(w)) is nn.Linear
    torch.testing.assert_close(logits(), lora_out, rtol=0, atol=PAD_TOL)  # fp32 floor: see PAD_TOL
    merged = dict(list(bb.named_parameters()) + list(bb.named_buffers()))
    assert set(merged) == names_before
    for n, t in exported.items():
        torch.testing.assert_close(t, merged[n], rtol=0, atol=1e-6)


def test_lora_training_exports_a_merged_checkpoint(ckpt, data_file, tmp_path, monkeypatch):
    made = []

    class Spy(DiffusionObjective):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(trainer_mod, "DiffusionObjective", Spy)
    out = tmp_path / "lora"
    final = train(_cfg(ckpt, data_file, out, steps=3, lr=1e-2, lora_rank=4, lora_alpha=8.0), show_progress=False)
    bb = made[-1].backbone  # the LoRA-wrapped model as trained in memory
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert any(float(p.abs().max()) > 0 for n, p in bb.named_parameters() if "lora_B" in n), "LoRA never trained"
    st = torch.load(final / "trainer_state.pt", weights_only=False)
    assert st["lora"] is not None and set(st["lora"]) == set(trainable)

    merged = dgemma.load(final, dtype=torch.float32, device="cpu").backbone
    original = dgemma.load(ckpt, dtype=torch.float32, device="cpu").backbone
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    init = _state(ckpt)
    saved = dict(merged.named_parameters())
    for n, p in saved.items():  # only the LoRA targets changed (experts, router, norms, embedding frozen)
        is_target = any(n.endswith(t + ".weight") for t in TARGETS)
        assert torch.equal(p, init[n]) != is_target, n
    batch = _mixed_batch()
    noisy = torch.randint(3, V, batch.canvas.shape, generator=torch.Generator().manual_seed(10))
    bb.eval()
    with torch.no_grad():
        for b in range(4):
            P = int(batch.canvas_start[b])
            ref = _reference_row(bb, batch.ids[b], P, noisy[b])
            got = _reference_row(merged, batch.ids[b], P, noisy[b])
            torch.testing.assert_close(got, ref, rtol=0, atol=PAD_TOL)  # fp32 floor: see PAD_TOL
            base = _reference_row(original, batch.ids[b], P, noisy[b])
            assert float((base - ref).abs().max()) > 100 * PAD_TOL, "training barely changed the LoRA model"

    # the LoRA state in trainer_state.pt reproduces the in-memory model on top of the original weights
    fresh = dgemma.load(ckpt, dtype=torch.float32, device="cpu").backbone
    apply_lora(fresh, 4, 8.0)
    missing, unexpected = fresh.load_state_dict(st["lora"], strict=False)
    assert not unexpected
    for n, p in lora_state(bb).items():
        assert torch.equal(dict(fresh.named_parameters())[n], p)


# --------------------------------------------------------------------------------------------------------------
# 9. configuration and data errors
def test_train_config_file_and_overrides(tmp_path):
    f = tmp_path / "sft.toml"
    f.write_text('model = "m"\ndata = "d.jsonl"\nsteps = 7\nlr = 2e-4\nbetas = [0.9, 0.95]\nsc_prob = 0.25\n')
    cfg = TrainConfig.from_file(f, {"steps": 9, "lr": None, "lora_rank": 8})
    assert (cfg.model, cfg.data, cfg.steps, cfg.lr, cfg.betas, cfg.sc_prob, cfg.lora_rank) == \
        ("m", "d.jsonl", 9, 2e-4, [0.9, 0.95], 0.25, 8)


@pytest.mark.parametrize("over, match", [
    ({"stepz": 3}, r"unknown training option\(s\): stepz"),
    ({"steps": 0}, r"steps=0 is invalid; expected a positive integer"),
    ({"steps": 2.5}, r"steps=2.5 is invalid"),
    ({"batch_size": True}, r"batch_size=True is invalid"),
    ({"lr": -1}, r"lr=-1 is invalid; expected a number > 0"),
    ({"lr": 0}, r"lr=0 is invalid"),
    ({"sc_prob": 2}, r"sc_prob=2 is invalid; expected a probability in \[0, 1\]"),
    ({"t_lo": 0}, r"t_lo=0 is invalid"),
    ({"max_minutes": -1}, r"max_minutes=-1 is invalid; expected a number >= 0"),
    ({"weighting": "x"}, r"weighting='x' is invalid"),
    ({"objective": "mdm"}, r"objective='mdm' is invalid; expected 'diffusion' or 'ar'"),
    ({"model": ""}, r"no model given"),
    ({"data": ""}, r"no training data given"),
])
def test_train_config_rejects_bad_values(over, match):
    base = {"model": "m", "data": "d.jsonl"}
    with pytest.raises(DGemmaError, match=match):
        TrainConfig.from_file(None, {**base, **over})


def test_train_config_file_errors(tmp_path):
    with pytest.raises(DGemmaError, match="config file not found"):
        TrainConfig.from_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "m"\nsteps = = 3\n')
    with pytest.raises(DGemmaError, match=r"bad\.toml: cannot parse config"):
        TrainConfig.from_file(bad)
    unk = tmp_path / "unk.toml"
    unk.write_text('model = "m"\ndata = "d"\nlearning_rate = 1e-3\n')
    with pytest.raises(DGemmaError, match="unknown training option.*learning_rate"):
        TrainConfig.from_file(unk)


def test_cli_train_reports_config_errors(tmp_path, capsys):
    rc = cli.main(["train", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "error: no model given" in capsys.readouterr().err
    rc = cli.main(["train", "--model", "m", "--data", "d", "--set", "nokey"])
    assert rc == 2 and "expected KEY=VALUE" in capsys.readouterr().err


def test_load_jsonl_prompt_completion_and_chat(model, tmp_path):
    tok = model.tokenizer
    f = _write_jsonl(tmp_path / "ok.jsonl", [
        {"prompt": "3+4=", "completion": "7"},
        "",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "1+1=", "completion": "2" * 50},  # too long for max_len: dropped
    ])
    exs = load_jsonl(f, tok, max_len=30)
    assert len(exs) == 2 and exs.dropped == 1
    assert exs[0].prompt == tok.encode("3+4=")
    assert exs[0].response == tok.encode("7", add_special_tokens=False) + [tok.eos_token_id]
    assert exs[1].prompt == list(tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                         add_generation_prompt=True, tokenize=True))
    assert exs[1].response == tok.encode("yo", add_special_tokens=False) + [tok.token_to_id("<end_of_turn>")]
    no_eos = load_jsonl(f, tok, max_len=30, append_eos=False)
    assert no_eos[0].response == tok.encode("7", add_special_tokens=False)


def test_load_jsonl_errors(model, tmp_path):
    tok = model.tokenizer
    with pytest.raises(DataError, match="training data file not found"):
        load_jsonl(tmp_path / "missing.jsonl", tok, max_len=64)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "", "{not json"])
    with pytest.raises(DataError, match=rf"{bad.name}:3: not valid JSON"):
        load_jsonl(bad, tok, max_len=64)
    nofields = _write_jsonl(tmp_path / "nofields.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match=r"nofields\.jsonl:1: expected string fields 'prompt' and 'completion'"):
        load_jsonl(nofields, tok, max_len=64)
    arr = _write_jsonl(tmp_path / "arr.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"arr\.jsonl:1: expected a JSON object"):
        load_jsonl(arr, tok, max_len=64)
    chat = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: 'messages' must be a list ending with an assistant"):
        load_jsonl(chat, tok, max_len=64)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "completion": ""}])
    with pytest.raises(DataError, match=r"empty\.jsonl:1: the completion is empty"):
        load_jsonl(empty, tok, max_len=64, append_eos=False)
    # errors come in file order: the empty completion on line 1 before the bad JSON on line 2
    order = _write_jsonl(tmp_path / "order.jsonl", [{"prompt": "a", "completion": ""}, "{not json"])
    with pytest.raises(DataError, match=r"order\.jsonl:1: the completion is empty"):
        load_jsonl(order, tok, max_len=64, append_eos=False)
    long = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a", "completion": "b" * 100}])
    with pytest.raises(DataError, match=r"no usable examples \(dropped 1 longer than max_len=8\)"):
        load_jsonl(long, tok, max_len=8)
    assert issubclass(DataError, DGemmaError)


# --------------------------------------------------------------------------------------------------------------
# throughput pieces: the grouped product's backward, the FLOP count, the device-side data
def test_grouped_mm_backward_matches_per_group_products():
    """The experts' backward (one grouped product for the weight gradient where torch has it, else a loop) equals
    plain per-group products, empty groups and rows past the last offset included."""
    from dgemma.model import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 8, 4, generator=g, requires_grad=True)
    offs = torch.tensor([5, 5, 20], dtype=torch.int32)  # group 1 empty; rows 20-23 are padding
    y = ops.grouped_mm(x, w, offs)
    up = torch.randn(24, 4, generator=g)
    (y[:20] * up[:20]).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    yr = torch.cat([xr[0:5] @ wr[0], xr[5:20] @ wr[2]])
    (yr * up[:20]).sum().backward()
    assert torch.allclose(y[:20], yr, atol=1e-5)
    assert torch.allclose(x.grad[:20], xr.grad[:20], atol=1e-5)
    assert torch.allclose(w.grad, wr.grad, atol=1e-5) and bool((w.grad[1] == 0).all())


def test_flop_model_counts_the_decoder_pass_products(model):
    """FlopModel's count of a decoder pass equals torch's FLOP counter over the same pass (linear layers, the
    experts' grouped products, attention and the head)."""
    from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

    from dgemma.train.flops import FlopModel

    @register_flop_formula(torch.ops.dgemma.grouped_mm)
    def _gmm_flops(x_shape, w_shape, offs_shape, *args, out_shape=None, **kw):
        return 2 * x_shape[0] * x_shape[1] * w_shape[2]

    bb = model.backbone
    fm = FlopModel.of(bb)
    W = bb.cfg.sliding_window
    g = torch.Generator().manual_seed(0)
    for B, P in ((3, 20), (2, W + 9)):  # the whole prefix visible; the sliding layers' window cuts it
        ids = torch.randint(4, V, (B, P), generator=g)
        canvas = torch.randint(4, V, (B, L), generator=g)
        ok = torch.ones(B, P, dtype=torch.bool)
        with torch.no_grad():
            with FlopCounterMode(display=False) as enc_count:
                _, kvs = encode_clean(bb, ids, ok)
            with FlopCounterMode(display=False) as dec_count:
                denoise_at(bb, canvas, torch.full((B,), P), kvs, ok)
        dec = fm.forward(B * L, P, L, head=True)
        assert abs(dec_count.get_total_flops() - dec) <= 1e-6 * dec, (dec_count.get_total_flops(), dec)
        # the dense reference attention computes every key of the rectangle (masked ones too): the model count,
        # which takes only the visible keys, is below it by at most the masked half of the causal square
        enc, counted = fm.forward(B * P, 0, P, causal=True), enc_count.get_total_flops()
        assert 0.75 * counted <= enc <= counted, (counted, enc)
    assert fm.step(B, P, L, P) > 4 * dec  # the step: encoder fwd+bwd, pass 1, pass 2 fwd+bwd


def test_tensor_data_batches_on_the_device_side_equal_collate():
    from dgemma.train.data import TensorData

    examples = [Example(_toks(p, 10 + i), _toks(r, 20 + i)) for i, (p, r) in enumerate([(3, 1), (5, 16), (4, 40)])]
    data = TensorData(examples, 0)
    assert data.ids.dtype == torch.int32 and len(data) == 3
    a = data.batch([2, 0], L, torch.Generator().manual_seed(4))
    b = collate([examples[2], examples[0]], L, 0, torch.Generator().manual_seed(4))
    for f in ("ids", "valid", "canvas_start", "supervised", "canvas", "response"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.span == (int(a.canvas_start.min()), int(a.canvas_start.max()) + L)
    assert a.tokens == int(a.valid.sum()) + int(a.supervised.sum())
    short = a.prefix_only()
    assert short.ids.shape[1] == int(a.canvas_start.max()) and short.span == a.span
    marked = data.batch([1], L, None, transform=lambda ids: ids + 1)  # the transform sees the rows first
    assert torch.equal(marked.ids[0, :21], torch.tensor(examples[1].prompt + examples[1].response) + 1)
    with pytest.raises(DataError, match="example 1 of the batch has an empty response"):
        TensorData([examples[0], Example([2], [])], 0)


@pytest.mark.skipif(not os.environ.get("DGEMMA_SLOW_TESTS"),
                    reason="compiling the objective takes a minute or two on 2 cores; DGEMMA_SLOW_TESTS=1 runs it")
def test_compiled_objective_gives_the_eager_gradients(model):
    """compile_objective (CPU: inductor without vectorisation, whose vectorised backward got the keys' gradients
    wrong) gives eager training's loss and gradients."""
    bb = model.backbone.train().requires_grad_(True)
    batch = _mixed_batch().prefix_only()
    obj = DiffusionObjective(bb, ObjectiveConfig(ar_weight=0.0))

    def run(f):
        bb.zero_grad(set_to_none=True)
        out = f(batch, torch.Generator().manual_seed(5))
        out["loss"].backward()
        return float(out["loss"]), {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}

    (le, ge), (lc, gc) = run(obj), run(objective_mod.compile_objective(obj, torch.device("cpu")))
    assert abs(le - lc) <= 1e-4 * max(1.0, le)
    for n in ge:
        err = float((gc[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-12))
        assert err < 1e-3, f"{n}: relative gradient difference {err:.2e}"


def test_compile_option_compiles_with_scalar_cpu_loops(ckpt, data_file, tmp_path, monkeypatch):
    """compile=true is accepted; on a CPU the objective compiles with cpp.simdlen=1 (the workaround the slow test
    above checks), elsewhere with inductor's defaults."""
    _cfg(ckpt, data_file, tmp_path / "c", compile=True).validate()
    seen: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    objective_mod.compile_objective(nn.Identity(), torch.device("cpu"))
    objective_mod.compile_objective(nn.Identity(), torch.device("cuda"))
    assert seen == [{"options": {"cpp.simdlen": 1}}, {"options": None}]
