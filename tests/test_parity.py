"""Parity with the oracle (HF transformers 5.23 `DiffusionGemmaForBlockDiffusion`, eager attention).

Logits: fp32 within 1e-4 (in practice bit-identical). Generation: exact token equality under the same seed —
`dgemma generate(seed=s)` vs `torch.manual_seed(s); reference.generate(...)`.
"""

from __future__ import annotations

import pytest
import torch

import dgemma

VARIANTS = ["spec", "wide"]


def _ref_logits(ref, ids, canvas, am=None, sc_logits=None, sc_mask=None, second_block=None):
    """Encoder over ids (and optionally a second block), then one decoder call, through the oracle's own API."""
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    S = ids.shape[1]
    kw = {} if am is None else {"attention_mask": am}
    ref.model.encoder(input_ids=ids, past_key_values=cache, position_ids=torch.arange(S)[None], **kw)
    P = S
    if second_block is not None:
        am2 = None if am is None else torch.cat([am, torch.ones_like(second_block)], 1)
        kw = {} if am2 is None else {"attention_mask": am2}
        n = second_block.shape[1]
        ref.model.encoder(input_ids=second_block, past_key_values=cache, position_ids=torch.arange(P, P + n)[None], **kw)
        am, P = am2, P + n
    dkw = {}
    if am is not None:
        dkw["decoder_attention_mask"] = torch.cat([am, torch.ones_like(canvas)], 1).bool()
    return ref(past_key_values=cache, decoder_input_ids=canvas, self_conditioning_logits=sc_logits,
               self_conditioning_mask=sc_mask, decoder_position_ids=torch.arange(P, P + canvas.shape[1])[None],
               **dkw).logits


def _ours(model, ids, canvas, am=None, sc_logits=None, sc_mask=None, second_block=None):
    bb = model.backbone
    cache = bb.new_cache(ids.shape[0], 8)  # deliberately small: exercises cache growth
    bb.encode(ids, cache, am)
    if second_block is not None:
        bb.encode(second_block, cache, None)
    sc = None if sc_logits is None else bb.soft_embed(sc_logits)
    return bb.denoise(canvas, cache, sc, sc_mask)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_logits_match_reference(variant, ckpt_factory, load_reference):
    path = ckpt_factory(variant)
    ref, model = load_reference(path), dgemma.load(path)
    V, L, W = model.config.text.vocab_size, model.config.canvas_length, model.config.text.sliding_window
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 3 * W + 1), generator=g)  # longer than the sliding window
    canvas = torch.randint(0, V, (2, L), generator=g)
    sc_logits = torch.randn(2, L, V, generator=g) * 4
    block2 = torch.randint(0, V, (2, L), generator=g)
    am = torch.ones_like(ids, dtype=torch.bool)
    am[1, :5] = False  # left padding on row 1
    cases = {
        "plain": {},
        "self-conditioning": {"sc_logits": sc_logits},
        "sc-mask": {"sc_logits": sc_logits, "sc_mask": torch.tensor([True, False])},
        "second-block": {"second_block": block2, "sc_logits": sc_logits},
        "left-padding": {"am": am, "sc_logits": sc_logits},
        "left-padding+block": {"am": am, "second_block": block2},
    }
    for name, kw in cases.items():
        r = _ref_logits(ref, ids, canvas, **kw)
        o = _ours(model, ids, canvas, **kw)
        assert o.shape == r.shape == (2, L, V)
        err = (o - r).abs().max().item()
        assert err <= 1e-4, f"{variant}/{name}: max |Δlogits| = {err}"


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_encoder_hidden_states_match(variant, ckpt_factory, load_reference):
    """The encoder's final hidden state (used for the AR loss / AR mode later) matches too."""
    path = ckpt_factory(variant)
    ref, model = load_reference(path), dgemma.load(path)
    ids = torch.randint(3, model.config.text.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    from transformers import DynamicCache

    out = ref.model.encoder(input_ids=ids, past_key_values=DynamicCache(config=ref.config.get_text_config(decoder=True)),
                            position_ids=torch.arange(20)[None])
    ours = model.backbone.encode(ids, model.backbone.new_cache(1, 20), final_norm=True)
    assert (ours - out.last_hidden_state).abs().max().item() <= 1e-5


def _compare_generate(ref, model, ids, seed, **kw):
    from transformers import EntropyBoundSamplerConfig

    ref_kw = dict(kw)
    if "entropy_bound" in ref_kw:  # the reference takes it inside sampler_config (it ignores a bare kwarg)
        ref_kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(ref_kw.pop("entropy_bound")))
    torch.manual_seed(seed)
    r = ref.generate(ids, **ref_kw)
    o = model.generate(ids, seed=seed, sampler="reference", **kw)
    assert o.sequences.shape == r.sequences.shape, (o.sequences.shape, r.sequences.shape)
    assert torch.equal(o.sequences, r.sequences), f"seed {seed} {kw}: tokens differ"
    assert torch.equal(o.tokens_per_forward, r.tokens_per_forward), (o.tokens_per_forward, r.tokens_per_forward)
    return o


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@torch.no_grad()
def test_generate_token_exact(variant, seed, ckpt_factory, load_reference):
    path = ckpt_factory(variant)
    ref, model = load_reference(path), dgemma.load(path)
    L = model.config.canvas_length
    ids = torch.randint(3, model.config.text.vocab_size, (2, 11), generator=torch.Generator().manual_seed(100 + seed))
    # several canvases, max_new_tokens not a multiple of the canvas
    _compare_generate(ref, model, ids, seed, max_new_tokens=2 * L + 3)


@pytest.mark.parametrize("S,conf", [(0, 0.2), (1, 0.5), (3, 0.5)])
@torch.no_grad()
def test_generate_stability_thresholds_and_row_stopping(S, conf, ckpt_factory, load_reference):
    """stability_threshold 0/1/3 with a confidence threshold loose enough that rows stop early, at different steps."""
    path = ckpt_factory("spec")
    ref, model = load_reference(path), dgemma.load(path)
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(7))
    diverged = False
    for seed in range(2):
        o = _compare_generate(ref, model, ids, seed, max_new_tokens=24, stability_threshold=S,
                              confidence_threshold=conf, eos_token_id=None)
        steps = torch.tensor(o.steps_per_canvas)  # [B, canvases]
        assert (steps < 48).any(), "expected early stopping"
        diverged |= bool((steps != steps[0]).any())
        if S:
            assert (steps >= S + 1).all(), "a row cannot be stable before S+1 steps"
    assert diverged, "rows never stopped at different steps; the test lost its power"


@torch.no_grad()
def test_generate_left_padded_batch(ckpt_factory, load_reference):
    path = ckpt_factory("spec")
    # the reference's generate only supports attention_mask with SDPA attention (see conftest.load_reference)
    ref, model = load_reference(path, attn="sdpa"), dgemma.load(path)
    ids = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(9))
    am = torch.ones(3, 12, dtype=torch.long)
    am[1, :4] = 0
    am[2, :9] = 0
    ids[am == 0] = 0
    for seed in (0, 5):
        torch.manual_seed(seed)
        r = ref.generate(ids, attention_mask=am, max_new_tokens=16)
        o = model.generate(ids, am, seed=seed, sampler="reference", max_new_tokens=16)
        assert torch.equal(o.sequences, r.sequences)
        assert torch.equal(o.tokens_per_forward, r.tokens_per_forward)


@torch.no_grad()
def test_generate_eos_inside_canvas(ckpt_factory, load_reference):
    """Make EOS fire mid-canvas by declaring frequent tokens EOS: later positions and canvases become pad."""
    path = ckpt_factory("spec")
    ref, model = load_reference(path), dgemma.load(path)
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(11))
    probe = model.generate(ids, seed=0, sampler="reference", max_new_tokens=24, eos_token_id=None)
    new = probe.sequences[:, 10:]
    # the token at position 3 of the first canvas of row 0 becomes an EOS id
    eos = sorted({int(new[0, 3]), 1})
    saw_pad_after_eos = False
    for seed in range(3):
        o = _compare_generate(ref, model, ids, seed, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
        gen = o.sequences[:, 10:]
        for row in gen:
            hits = torch.isin(row, torch.tensor(eos)).nonzero()
            if len(hits) and hits[0].item() + 1 < len(row):
                assert (row[hits[0].item() + 1:] == 0).all(), "tokens after the first EOS must be pad"
                saw_pad_after_eos = True
    assert saw_pad_after_eos, "EOS never appeared mid-sequence; the test lost its power"


@torch.no_grad()
def test_generate_other_sampler_settings(ckpt_factory, load_reference):
    path = ckpt_factory("wide")
    ref, model = load_reference(path), dgemma.load(path)
    ids = torch.randint(3, 320, (1, 1), generator=torch.Generator().manual_seed(2))  # a one-token prompt
    _compare_generate(ref, model, ids, 4, max_new_tokens=16, max_denoising_steps=7, t_min=0.1, t_max=1.3,
                      entropy_bound=2.5)
    _compare_generate(ref, model, ids, 5, max_new_tokens=40, max_denoising_steps=5, entropy_bound=0.001)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_generate_bf16_token_exact(variant, ckpt_factory, load_reference):
    """bf16 end to end (embed_scale rounding, bf16 RoPE tables, fp32 expert sums, frozen-row merge)."""
    path = ckpt_factory(variant, torch.bfloat16)
    ref, model = load_reference(path, torch.bfloat16), dgemma.load(path)
    assert model.dtype == torch.bfloat16
    ids = torch.randint(3, model.config.text.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    for seed in (0, 1):
        _compare_generate(ref, model, ids, seed, max_new_tokens=2 * model.config.canvas_length,
                          confidence_threshold=0.5)


@torch.no_grad()
def test_generator_argument_and_determinism(ckpt_factory):
    model = dgemma.load(ckpt_factory("spec"))
    ids = torch.tensor([[5, 6, 7]])
    a = model.generate(ids, seed=3, max_new_tokens=8, sampler="reference")
    b = model.generate(ids, generator=torch.Generator().manual_seed(3), max_new_tokens=8, sampler="reference")
    c = model.generate(ids, seed=4, max_new_tokens=8, sampler="reference")
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
