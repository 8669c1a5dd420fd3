"""The Python API beyond parity: opt-in extras (trim, stop strings, revisions, per-canvas steps), callbacks,
generation defaults, the single-weight-set invariant, `init` presets, and bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

import dgemma
from dgemma.presets import PRESETS, init_checkpoint, preset_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return dgemma.load(init_checkpoint("tiny", tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def spec(ckpt_factory):
    return dgemma.load(ckpt_factory("spec"))


def test_one_weight_set(spec):
    """Encoder, decoder and lm_head share storage: every parameter is a distinct tensor, nothing duplicated."""
    params = list(spec.backbone.parameters())
    ptrs = {p.data_ptr() for p in params}
    assert len(ptrs) == len(params)
    n_params = sum(p.numel() for p in params)
    n_buffers = sum(b.numel() for b in spec.backbone.buffers())
    assert n_buffers == 2 * spec.config.text.num_hidden_layers  # encoder + decoder layer scalars only
    assert n_params + n_buffers == spec.config.text.param_counts()["total"]


def test_param_counts_match_presets(tiny):
    counted = sum(p.numel() for p in tiny.backbone.parameters()) + sum(b.numel() for b in tiny.backbone.buffers())
    assert counted == tiny.config.text.param_counts()["total"]
    cfg, _ = preset_config("26b-a4b")
    pc = cfg.text.param_counts()
    # the released model (spec §1.2 shapes): ~25.25B total, ~3.84B active per token (embedding included)
    assert 25.0e9 < pc["total"] < 26.5e9, pc
    assert 3.6e9 < pc["active"] < 4.1e9, pc


def test_defaults_come_from_generation_config(spec, tmp_path):
    assert spec.resolve_generation_config().max_denoising_steps == 48
    gc = json.loads((spec.path / "generation_config.json").read_text())
    assert spec.resolve_generation_config().eos_ids == [gc["eos_token_id"]]
    assert spec.resolve_generation_config(max_denoising_steps=5).max_denoising_steps == 5


def test_outputs_whole_canvases_by_default_and_trim(spec):
    ids = torch.tensor([[5, 6, 7, 8]])
    L = spec.config.canvas_length
    full = spec.generate(ids, seed=1, max_new_tokens=L + 3, eos_token_id=None)
    assert full.sequences.shape[1] == 4 + 2 * L  # the reference never truncates
    trimmed = spec.generate(ids, seed=1, max_new_tokens=L + 3, eos_token_id=None, trim=True)
    assert trimmed.sequences.shape[1] == 4 + L + 3
    assert torch.equal(trimmed.sequences, full.sequences[:, : 4 + L + 3])
    assert trimmed.finish_reasons == ["length"]


@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_steps_per_canvas_and_callbacks(spec, sampler):
    ids = torch.tensor([[5, 6, 7], [9, 10, 11]])
    steps, canvases = [], []
    out = spec.generate(ids, seed=2, max_new_tokens=24, confidence_threshold=0.5, eos_token_id=None,
                        on_step=steps.append, on_canvas=canvases.append, sampler=sampler)
    assert len(canvases) == out.num_canvases == 3
    per_row = torch.tensor(out.steps_per_canvas)
    assert per_row.shape == (2, 3)
    if sampler == "reference":  # one on_step call per decoder pass; a canvas runs as long as its slowest row
        assert len(steps) == int(per_row.max(dim=0).values.sum())
    else:  # rows run on their own: a row goes on with its next canvas as soon as its canvas commits
        assert len(steps) == int(per_row.sum(dim=1).max())
    s = steps[0]
    assert s.draft.shape == s.canvas.shape == s.accepted.shape == s.entropy.shape == (2, 8)
    assert s.step == 1 and s.steps_remaining == 48 and abs(s.temperature - 0.8) < 1e-6
    assert s.accepted.any(dim=1).all()  # the lowest-entropy position is always accepted
    for c in canvases:
        assert torch.equal(c.tokens, out.sequences[:, 3 + 8 * c.index: 3 + 8 * (c.index + 1)])
    # tokens_per_forward is exactly new non-pad tokens over this row's decoder passes (without EOS a row is never
    # padded, but the model may still draw the pad id itself)
    non_pad = (out.sequences[:, 3:] != spec.generation_config.pad_token_id).sum(1)
    assert torch.allclose(out.tokens_per_forward, non_pad / per_row.sum(1))


def test_revisions_count_self_correction(spec):
    ids = torch.tensor([[5, 6, 7]])
    # accept everything every step: every position is accepted at every step, so any change is a revision
    out = spec.generate(ids, seed=0, max_new_tokens=8, entropy_bound=1e9, eos_token_id=None,
                        confidence_threshold=1e-9, sampler="reference")
    assert out.revisions is not None and out.revisions.shape == (1,)
    assert out.revisions.item() > 0
    # accept (almost) only one token per step: tokens are still re-sampled, but far fewer positions are revisable
    few = spec.generate(ids, seed=0, max_new_tokens=8, entropy_bound=1e-9, eos_token_id=None,
                        confidence_threshold=1e-9, sampler="reference")
    assert few.revisions.item() < out.revisions.item()


def test_stop_strings(tiny):
    tok = tiny.tokenizer
    ids = torch.tensor([tok.encode("Tell me a story")])
    base = tiny.generate(ids, seed=3, max_new_tokens=48, eos_token_id=None)
    text = tok.decode(base.sequences[0, ids.shape[1]:].tolist())
    stop = text[10:13]  # a string that certainly occurs in the completion
    out = tiny.generate(ids, seed=3, max_new_tokens=48, eos_token_id=None, stop=[stop])
    assert out.finish_reasons == ["stop"]
    new = out.sequences[0, ids.shape[1]:].tolist()
    kept = [t for t in new if t != tok.pad_token_id]
    kept_text = tok.decode(kept)
    assert stop not in kept_text and text.startswith(kept_text)
    assert len(kept_text) <= text.find(stop)
    # generation ended with the canvas that contained the stop string
    assert out.num_canvases <= base.num_canvases


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid; expected a positive integer"),
    ({"max_denoising_steps": -1}, "max_denoising_steps=-1 is invalid"),
    ({"t_min": 0.9, "t_max": 0.5}, r"t_max=0.5 is invalid; expected a number > t_min \(0.9\)"),
    ({"entropy_bound": 0}, "entropy_bound=0 is invalid"),
    ({"stability_threshold": 1.5}, "stability_threshold=1.5 is invalid"),
    ({"confidence_threshold": float("nan")}, "confidence_threshold=nan is invalid"),
    ({"eos_token_id": "x"}, "eos_token_id='x' is invalid"),
    # every step's temperature in [1e-6, 1e6] (a schedule that rounds to 0 in fp32 would give NaN logits)
    ({"t_min": 0, "t_max": 1e-300}, "t_max=1e-300 is invalid with t_min=0 .*would be 2.08e-302; expected at least"),
    ({"t_min": 1e300, "t_max": 2e300}, r"t_max=2e\+300 is invalid; expected a number <= 1e\+06"),
    ({"max_denoising_steps": 10**7}, "max_denoising_steps=10000000 is invalid; expected a positive integer up to"),
])
def test_bad_generation_settings(spec, kwargs, match):
    with pytest.raises(dgemma.ConfigError, match=match):
        spec.generate(torch.tensor([[5, 6]]), **kwargs)


@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_settings_beyond_fp32_saturate(spec, sampler):
    """entropy_bound / confidence_threshold beyond fp32's range and stability_threshold ≥ the step count behave as
    their saturated values (accept all, always confident, never stable); they used to fail the fast sampler."""
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(seed=4, sampler=sampler, max_new_tokens=8, max_denoising_steps=3)
    huge = spec.generate(ids, entropy_bound=1e300, confidence_threshold=1e300, stability_threshold=2**64, **kw)
    same = spec.generate(ids, entropy_bound=3e38, confidence_threshold=3e38, stability_threshold=3, **kw)
    assert torch.equal(huge.sequences, same.sequences)
    assert huge.steps_per_canvas == same.steps_per_canvas


def test_float16_self_conditioning_stays_finite_near_temperature_zero(ckpt_factory):
    """z = logits / T beyond float16's range (T near 0): the reference's cast to the model dtype would give inf
    and a NaN softmax; soft_embed clamps z to the dtype's range first (an identity for in-range z)."""
    m = dgemma.load(ckpt_factory("spec"), dtype="float16")
    V = m.config.text.vocab_size
    z = torch.randn(1, 3, V, generator=torch.Generator().manual_seed(0))
    z[0, 0, 7] = 1e6  # float16 max is 65504
    sc = m.backbone.soft_embed(z)
    assert torch.isfinite(sc).all()
    one_hot = m.backbone.soft_embed_probs(torch.nn.functional.one_hot(torch.tensor(7), V).to(torch.float16))
    assert torch.allclose(sc[0, 0].float(), one_hot.float(), atol=1e-3)
    ok = z.clone()
    ok[0, 0, 7] = 30.0
    assert torch.equal(m.backbone.soft_embed(ok), m.backbone.soft_embed_probs(
        torch.softmax(ok.to(torch.float16), -1, dtype=torch.float32).to(torch.float16)))


@pytest.mark.parametrize("ids,mask,match", [
    ([[5, 6], [7]], None, "rectangular batch"),
    ([[0.5, 1.0]], None, "integer tensor"),
    ([[]], None, "non-empty"),
    ([[5, 300]], None, r"outside the vocabulary \[0, 256\)"),
    ([[5, -1]], None, "outside the vocabulary"),
    ([[5, 6]], [[1, 1, 1]], r"attention_mask has shape \[1, 3\], expected \[1, 2\]"),
])
def test_bad_inputs(spec, ids, mask, match):
    with pytest.raises(dgemma.DGemmaError, match=match):
        spec.generate(ids, mask, max_new_tokens=8)


def test_image_tokens_refused(tiny):
    tiny.config.image_token_id, saved = 900, tiny.config.image_token_id
    try:
        with pytest.raises(dgemma.UnsupportedInputError, match="text-only"):
            tiny.generate([[5, 900]], max_new_tokens=8)
    finally:
        tiny.config.image_token_id = saved


def test_missing_tokenizer_is_a_clear_error(spec):
    with pytest.raises(dgemma.CheckpointError, match="no tokenizer"):
        spec.tokenizer  # noqa: B018


def test_generate_text_chat(tiny):
    a = tiny.generate_text("hello", chat=True, seed=5, max_new_tokens=16)
    b = tiny.generate_text([{"role": "user", "content": "hello"}], seed=5, max_new_tokens=16)
    assert isinstance(a, str) and a == b


def test_init_presets_roundtrip_and_determinism(tmp_path):
    a = init_checkpoint("tiny", tmp_path / "a", seed=1)
    b = init_checkpoint("tiny", tmp_path / "b", seed=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    m = dgemma.load(a)
    assert m.tokenizer.vocab_size == m.config.text.vocab_size == PRESETS["tiny"]["text"]["vocab_size"]
    # sharded writing for models larger than a shard
    c = init_checkpoint("tiny", tmp_path / "c", seed=1, max_shard_bytes=300_000)
    assert (c / "model.safetensors.index.json").is_file()
    mc = dgemma.load(c)
    for (n1, p1), (n2, p2) in zip(m.backbone.named_parameters(), mc.backbone.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_init_checkpoint_loads_in_transformers(tmp_path):
    """What `dgemma init` writes is a real DiffusionGemma checkpoint: transformers loads it and agrees."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path = init_checkpoint("tiny", tmp_path / "t")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path, attn_implementation="eager").eval()
    ours = dgemma.load(path)
    ids = torch.tensor([ours.tokenizer.encode("The quick brown fox")])
    torch.manual_seed(7)
    r = ref.generate(ids, max_new_tokens=20)
    o = ours.generate(ids, seed=7, max_new_tokens=20, sampler="reference")
    assert torch.equal(r.sequences, o.sequences)


def test_ar_mode_matches_a_plain_next_token_loop(spec):
    """generate_ar (KV cache, one token per forward) == argmax of a full re-encode of the growing sequence."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])  # longer than the sliding window (8)
    out = spec.generate_ar(ids, max_new_tokens=12, eos_token_id=None)
    seq = ids.clone()
    bb = spec.backbone
    for _ in range(12):
        h = bb.encode(seq, bb.new_cache(1, seq.shape[1]), final_norm=False)
        seq = torch.cat([seq, bb.logits(h[:, -1:]).argmax(-1)], dim=1)
    assert torch.equal(out.sequences, seq)
    assert out.tokens_per_forward.tolist() == [1.0]


def test_ar_mode_stops_at_eos_and_pads(spec):
    ids = torch.tensor([[5, 6, 7], [9, 8, 7]])
    free = spec.generate_ar(ids, max_new_tokens=10, eos_token_id=None)
    eos = int(free.sequences[0, 5])  # the third generated token of row 0 becomes EOS
    out = spec.generate_ar(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    row = out.sequences[0, 3:].tolist()
    k = row.index(eos)
    assert all(t == 0 for t in row[k + 1:])
    assert out.finish_reasons[0] == "eos"
