"""The serving engine: batch invariance (tokens equal `model.generate` alone), admission, memory, cancellation."""

from __future__ import annotations

import asyncio

import pytest
import torch

import dgemma
from dgemma.engine import AsyncEngine, Engine, QueueFull, RequestRefused, SamplingParams
from dgemma.presets import init_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return dgemma.load(init_checkpoint("tiny", tmp_path_factory.mktemp("tiny")))


def expected_tokens(model, prompt, p: SamplingParams) -> list[int]:
    """What the engine must return: offline generate for the request alone, cut at EOS, trimmed to max_tokens."""
    ref = model.generate(torch.tensor([prompt]), seed=p.seed, max_new_tokens=p.max_tokens,
                         max_denoising_steps=p.max_denoising_steps, confidence_threshold=p.confidence_threshold,
                         stability_threshold=p.stability_threshold, entropy_bound=p.entropy_bound)
    out = []
    for t in ref.sequences[0, len(prompt):].tolist():
        if t in model.generation_config.eos_ids:
            break
        out.append(t)
    return out[: p.max_tokens]


def run_all(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, list]:
    events: dict[str, list] = {}
    for i, (prompt, p) in enumerate(requests):
        engine.add(prompt, p, events.setdefault(f"r{i}", []).append, f"r{i}")
    while engine.has_work():
        engine.step()
    return events


def random_requests(n: int, seed: int, vocab: int) -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(seed)

    def ri(a, b):
        return int(torch.randint(a, b, (1,), generator=g))

    reqs = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (ri(1, 40),), generator=g).tolist()  # includes GEMM-unsafe lengths
        reqs.append((prompt, SamplingParams(max_tokens=ri(5, 60), seed=1000 * seed + i,
                                            max_denoising_steps=ri(3, 12), confidence_threshold=0.3,
                                            stability_threshold=ri(0, 3))))
    return reqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_equals_offline_generate(tiny, dtype, tmp_path):
    """16 concurrent requests in every phase (prefill, denoise, commit at different times) give exactly the tokens
    each request gets alone from model.generate."""
    model = tiny if dtype == torch.float32 else dgemma.load(tiny.path, dtype=dtype)
    reqs = random_requests(16, seed=int(dtype == torch.bfloat16), vocab=model.config.text.vocab_size)
    engine = Engine(model, max_num_seqs=16)
    events = run_all(engine, reqs)
    for i, (prompt, p) in enumerate(reqs):
        fin = events[f"r{i}"][-1]
        assert fin.kind == "finished" and fin.finish_reason in ("stop", "length")
        assert fin.token_ids == expected_tokens(model, prompt, p), f"request {i} differs from offline generate"
        assert fin.completion_tokens == len(fin.token_ids) <= p.max_tokens
        assert fin.prompt_tokens == len(prompt)
    assert engine.stats()["kv_blocks_used"] == 0 and len(engine.free_slots) == 16  # every slot returned


def test_alone_or_among_others_identical(tiny):
    prompt, p = [5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=40, seed=42, max_denoising_steps=10)
    alone = run_all(Engine(tiny), [(prompt, p)])["r0"][-1].token_ids
    crowd = random_requests(15, seed=7, vocab=1024)
    crowd.insert(6, (prompt, p))
    among = run_all(Engine(tiny, max_num_seqs=4), crowd)["r6"][-1].token_ids  # joins mid-flight via the queue
    assert alone == among


def test_max_tokens_exact_and_canvas_events(tiny):
    L = tiny.config.canvas_length
    p = SamplingParams(max_tokens=L + 5, seed=1, max_denoising_steps=4, confidence_threshold=1e-9)
    tiny.generation_config.eos_token_id, saved = [], tiny.generation_config.eos_token_id
    try:
        ev = run_all(Engine(tiny), [([5, 6, 7], p)])["r0"]
    finally:
        tiny.generation_config.eos_token_id = saved
    canvases = [e for e in ev if e.kind == "canvas"]
    assert len(canvases) == 2  # ceil((L+5)/L) canvases, one event each
    fin = ev[-1]
    assert fin.finish_reason == "length" and len(fin.token_ids) == L + 5
    assert fin.denoising_steps == 8 and fin.canvases == 2
    assert "".join(e.text for e in ev) == tiny.tokenizer.decode(fin.token_ids, skip_special_tokens=True)


def test_stop_string_cuts_text_and_tokens(tiny):
    base = run_all(Engine(tiny), [([5, 6, 7], SamplingParams(max_tokens=40, seed=3, max_denoising_steps=4))])["r0"]
    text = "".join(e.text for e in base)
    stop = text[12:15]
    ev = run_all(Engine(tiny), [([5, 6, 7], SamplingParams(max_tokens=40, seed=3, max_denoising_steps=4,
                                                         stop=[stop]))])["r0"]
    got = "".join(e.text for e in ev)
    assert ev[-1].finish_reason == "stop"
    assert got == text[: text.find(stop)]
    # token_ids are the whole tokens before the stop; the text is cut inside the next token (the stop may begin
    # mid-token, e.g. "tra" in " travelled")
    kept, every = ev[-1].token_ids, base[-1].token_ids
    assert every[:len(kept)] == kept
    decode = lambda ids: tiny.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert got.startswith(decode(kept)) and decode(every[:len(kept) + 1]).startswith(got)


def test_drafts_are_streamed_on_request(tiny):
    ev = run_all(Engine(tiny), [([5, 6], SamplingParams(max_tokens=16, seed=0, max_denoising_steps=5,
                                                      stream_drafts=True))])["r0"]
    drafts = [e for e in ev if e.kind == "draft"]
    assert len(drafts) == ev[-1].denoising_steps and drafts[0].step == 1
    assert all(isinstance(d.draft_text, str) for d in drafts)


def test_admission_waits_for_a_slot_and_refuses_impossible(tiny):
    per_tok = Engine(tiny).kv_bytes_per_token
    L = tiny.config.canvas_length
    engine = Engine(tiny, max_num_seqs=2, kv_cache_bytes=per_tok * 96 * 2)  # two slots of 96 tokens
    with pytest.raises(RequestRefused, match=r"KV cache for 112 tokens .* holds 96"):
        engine.prepare(list(range(5, 53)), SamplingParams(max_tokens=4 * L))
    with pytest.raises(RequestRefused, match="context"):
        engine.prepare([5] * 4000, SamplingParams(max_tokens=200))
    # three requests, two slots: two run at once, the third waits, then runs
    reqs = [(list(range(5, 21)), SamplingParams(max_tokens=2 * L, seed=i, max_denoising_steps=3)) for i in range(3)]
    ev: dict[str, list] = {}
    for i, (pr, p) in enumerate(reqs):
        engine.add(pr, p, ev.setdefault(f"r{i}", []).append, f"r{i}")
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1
    while engine.has_work():
        engine.step()
    for i, (pr, p) in enumerate(reqs):
        assert ev[f"r{i}"][-1].token_ids == expected_tokens(tiny, pr, p)


@pytest.mark.parametrize("params,match", [
    (SamplingParams(max_tokens=0), "max_tokens=0 is invalid"),
    (SamplingParams(temperature=-1), "temperature=-1 is invalid"),
    (SamplingParams(max_denoising_steps=0), "max_denoising_steps=0 is invalid"),
    (SamplingParams(t_min=0.9, t_max=0.5), "t_max=0.5 is invalid"),
    (SamplingParams(sampler="greedy"), "sampler='greedy' is invalid; expected 'fast' or 'reference'"),
    (SamplingParams(t_min=0, t_max=1e-300), "last step's temperature"),
    (SamplingParams(t_min=0, t_max=1e-4, temperature=0), r"scaled by temperature=0: x0.001"),
    (SamplingParams(max_denoising_steps=2**64), "is too large; expected at most 1024"),
])
def test_bad_params_refused(tiny, params, match):
    with pytest.raises(RequestRefused, match=match):
        Engine(tiny).prepare([5, 6], params)


def test_bad_prompts_refused(tiny):
    e = Engine(tiny)
    with pytest.raises(RequestRefused, match="empty"):
        e.prepare([], SamplingParams())
    with pytest.raises(RequestRefused, match=r"integers in \[0, 1024\)"):
        e.prepare([5, 5000], SamplingParams())


def test_a_request_that_fails_to_start_is_aborted_not_lost(tiny, monkeypatch):
    """An error while admitting a request ends that request (finish_reason "abort", slot freed); it used to leave
    the request waiting forever and its slot taken."""
    e = Engine(tiny, max_num_seqs=1)
    real = e.stepper.start_row
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(e.stepper, "start_row", failing)
    ev: dict[str, list] = {"a": [], "b": []}
    e.add([5, 6], SamplingParams(max_tokens=4, max_denoising_steps=2), ev["a"].append, "a")
    e.add([5, 6], SamplingParams(max_tokens=4, max_denoising_steps=2), ev["b"].append, "b")
    for _ in range(50):
        if not e.has_work():
            break
        e.step()
    assert [o.finish_reason for o in ev["a"]] == ["abort"]
    assert ev["b"][-1].kind == "finished" and ev["b"][-1].finish_reason == "length"
    assert not e.has_work() and len(e.free_slots) == 1


def test_queue_full(tiny):
    e = Engine(tiny, max_queue=2)
    for i in range(2):
        e.add([5, 6], SamplingParams(max_tokens=8), lambda o: None)
    with pytest.raises(QueueFull, match="queue is full"):
        e.add([5, 6], SamplingParams(max_tokens=8), lambda o: None)


def test_temperature_scales_schedule(tiny):
    e = Engine(tiny)
    g, _, _, _ = e.prepare([5], SamplingParams(temperature=0.5))
    assert (g.t_min, g.t_max) == pytest.approx((0.2, 0.4))
    g, _, _, _ = e.prepare([5], SamplingParams(temperature=0))
    assert g.t_max == pytest.approx(0.8e-3) and g.t_min == pytest.approx(0.4e-3)


def test_async_cancellation_frees_slot(tiny):
    async def main():
        eng = AsyncEngine(tiny, max_num_seqs=2)
        eng.start()
        try:
            long = eng.generate([5, 6, 7], SamplingParams(max_tokens=400, seed=0, max_denoising_steps=48,
                                                          confidence_threshold=1e-9))
            first = await long.__anext__()  # running now
            assert first.kind == "canvas" and eng.stats()["running"] == 1
            await long.aclose()  # the client went away
            for _ in range(200):
                if eng.stats()["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert eng.stats()["running"] == 0 and eng.stats()["kv_blocks_used"] == 0
            # the slot is usable again
            outs = [o async for o in eng.generate([5, 6], SamplingParams(max_tokens=8, seed=1, max_denoising_steps=3))]
            assert outs[-1].kind == "finished" and outs[-1].finish_reason in ("stop", "length")
        finally:
            await eng.shutdown(drain_timeout=5)

    asyncio.run(main())
