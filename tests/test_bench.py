"""`dgemma bench` end to end on a tiny checkpoint, the weight-read floor arithmetic, and `generate --ar`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma import cli
from dgemma.bench import pass_weight_bytes, random_model
from dgemma.presets import init_checkpoint, preset_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return init_checkpoint("tiny", tmp_path_factory.mktemp("bench") / "tiny")


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bench_end_to_end_with_reference(capsys, ckpt, tmp_path):
    pytest.importorskip("transformers")
    out_json = tmp_path / "bench.json"
    rc, out, err = run(capsys, "bench", "--model", ckpt, "--prompt-len", 8, "--new-tokens", 32, "--repeats", 1,
                       "--sampler", "reference", "--json", out_json)
    assert rc == 0, err
    rep = json.loads(out_json.read_text())
    modes = [r["mode"] for r in rep["results"]]
    assert modes == ["fixed16", "fixed48", "adaptive", "ar", "reference-fixed16", "reference-fixed48",
                     "reference-adaptive"]
    by = {r["mode"]: r for r in rep["results"]}
    L = rep["settings"]["canvas_length"]
    canvases = -(-32 // L)
    # fixed modes run every step of every canvas (early stopping off); the reference does exactly the same work
    assert by["fixed16"]["steps"] == 16 * canvases and by["fixed48"]["steps"] == 48 * canvases
    assert by["fixed16"]["tokens_per_forward"] == pytest.approx(canvases * L / (16 * canvases))
    for m in ("fixed16", "fixed48", "adaptive"):
        ref = by[f"reference-{m}"]
        assert ref["same_tokens"] is True, m  # dgemma's tokens == the reference's for the same seed
        assert ref["tokens_per_forward"] == pytest.approx(by[m]["tokens_per_forward"])
    assert by["ar"]["steps"] == 32 and by["ar"]["tokens_per_forward"] == 1.0
    for r in rep["results"]:
        assert r["new_tokens"] == canvases * L if r["mode"] != "ar" else r["new_tokens"] == 32
        assert r["e2e_tok_s"] > 0 and r["total_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["floor_ms"] > 0 and 0 < r["floor_ratio"] < 1.5  # CPU: far from the bandwidth floor
    assert by["fixed16"]["ms_per_step"] > 0 and by["fixed16"]["ttft_ms"] >= by["fixed16"]["ms_per_step"]
    assert by["reference-fixed16"]["prefill_ms"] is None and by["reference-fixed16"]["decode_tok_s"] is None
    fl = rep["floor"]
    assert fl["bandwidth_gb_s"] > 0.1
    assert fl["diffusion_pass_ms"] == pytest.approx(fl["diffusion_pass_bytes"] / (fl["bandwidth_gb_s"] * 1e9) * 1e3)
    # the table names every mode and the floor line
    assert "bandwidth" in out and "reference-fixed48" in out and "yes" in out


def test_bench_random_weights_and_errors(capsys, ckpt):
    rc, out, err = run(capsys, "bench", "--random-weights", "--preset", "tiny", "--modes", "fixed16,ar",
                       "--prompt-len", 4, "--new-tokens", 16, "--repeats", 1, "--json", "-")
    assert rc == 0, err
    rep = json.loads(out)
    assert [r["mode"] for r in rep["results"]] == ["fixed16", "ar"]  # no reference without a checkpoint
    for argv, msg in [
        (["--random-weights"], "--random-weights needs --preset"),
        (["--model", ckpt, "--preset", "tiny"], "--preset is only for --random-weights"),
        (["--model", ckpt, "--modes", "fixed16,warp"], "unknown mode(s) warp"),
        (["--model", ckpt, "--new-tokens", "0"], "--new-tokens must be a positive integer"),
        (["--model", ckpt, "--prompt-len", "100000"], "exceeds the model's"),
    ]:
        rc, _, err = run(capsys, "bench", *argv)
        assert rc == 2 and msg in err and "Traceback" not in err, (argv, err)


def test_random_model_is_the_preset_architecture(ckpt):
    m = random_model("tiny", device="cpu", seed=0)
    cfg, _ = preset_config("tiny")
    written = dgemma.load(ckpt)  # `dgemma init --preset tiny`: the same tensors, names and shapes
    assert {n: t.shape for n, t in m.backbone.state_dict().items()} == \
        {n: t.shape for n, t in written.backbone.state_dict().items()}
    assert m.dtype == torch.float32
    w = m.backbone.layers[0].mlp.gate_proj.weight
    assert 0.015 < float(w.std()) < 0.025  # N(0, 0.02), not left uninitialised
    out = m.generate(torch.tensor([[5, 6, 7]]), seed=0, max_new_tokens=cfg.canvas_length, max_denoising_steps=2)
    assert out.sequences.shape == (1, 3 + cfg.canvas_length)


def test_pass_weight_bytes_counts_the_experts_tokens_reach():
    cfg, _ = preset_config("26b-a4b")
    c = cfg.text.param_counts()
    one = pass_weight_bytes(cfg.text, 1, 2)
    assert one == pytest.approx(c["active"] * 2, rel=1e-6)  # one token reads exactly its top-k experts
    full = pass_weight_bytes(cfg.text, 256, 2)
    assert c["active"] * 2 < full <= c["total"] * 2
    assert full == pytest.approx(c["total"] * 2, rel=0.01)  # 256 tokens × top-8 of 128 reach nearly every expert


def test_generate_ar_flag_matches_the_api(capsys, ckpt):
    model = dgemma.load(ckpt)
    prompt = "Hello there"
    ids = model.tokenizer.encode(prompt)
    rc, out, err = run(capsys, "generate", "--model", ckpt, "--ar", "--max-new-tokens", 12, prompt)
    assert rc == 0, err
    ref = model.generate_ar(torch.tensor([ids]), max_new_tokens=12)
    new = []
    for t in ref.sequences[0, len(ids):].tolist():
        if t == model.generation_config.pad_token_id:
            continue
        new.append(t)
        if t in model.generation_config.eos_ids:
            break
    assert out == model.tokenizer.decode(new, skip_special_tokens=True) + "\n"
    assert "autoregressive (greedy) · 12 forwards" in err or "finish: eos" in err
    rc, _, err = run(capsys, "generate", "--model", ckpt, "--ar", "--watch", "--steps", 4, "--seed", 1, prompt)
    assert rc == 2 and "--ar decodes greedily" in err
    assert "--watch" in err and "--steps" in err and "--seed" in err
