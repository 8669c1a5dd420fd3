"""Many concurrent streaming clients against a real `dgemma serve` process: every request completes, and each
one's text equals offline `model.generate` for that request alone (batch invariance through the whole stack)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from server_utils import ServerProcess

import dgemma

openai = pytest.importorskip("openai")

N_REQUESTS = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from dgemma.presets import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("conc") / "tiny")


def offline_text(model, prompt_ids: list[int], seed: int, max_tokens: int, steps: int) -> tuple[str, int]:
    out = model.generate(torch.tensor([prompt_ids]), seed=seed, max_new_tokens=max_tokens, max_denoising_steps=steps)
    toks = []
    for t in out.sequences[0, len(prompt_ids):].tolist():
        if t in model.generation_config.eos_ids:
            break
        toks.append(t)
    toks = toks[:max_tokens]
    return model.tokenizer.decode(toks, skip_special_tokens=True), len(toks)


def test_32_concurrent_streams_equal_offline_generate(ckpt, tmp_path):
    srv = ServerProcess(ckpt, tmp_path / "server.log", "--model-name", "tiny", "--max-num-seqs", "16")
    try:
        specs = []
        for i in range(N_REQUESTS):
            chat = i % 2 == 1
            prompt = f"Request number {i}: " + "tell me something " * (i % 5)
            specs.append(dict(i=i, chat=chat, prompt=prompt, seed=100 + i, max_tokens=8 + (i * 7) % 41,
                              steps=3 + i % 6))

        async def one(client, s):
            extra = {"max_denoising_steps": s["steps"]}
            if s["chat"]:
                stream = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": s["prompt"]}], max_tokens=s["max_tokens"],
                    seed=s["seed"], stream=True, stream_options={"include_usage": True}, extra_body=extra)
                parts, usage, finish = [], None, None
                async for ch in stream:
                    if ch.usage:
                        usage = ch.usage
                    for c in ch.choices:
                        parts.append(c.delta.content or "")
                        finish = c.finish_reason or finish
            else:
                stream = await client.completions.create(
                    model="tiny", prompt=s["prompt"], max_tokens=s["max_tokens"], seed=s["seed"], stream=True,
                    stream_options={"include_usage": True}, extra_body=extra)
                parts, usage, finish = [], None, None
                async for ch in stream:
                    if ch.usage:
                        usage = ch.usage
                    for c in ch.choices:
                        parts.append(c.text or "")
                        finish = c.finish_reason or finish
            return "".join(parts), usage, finish

        async def main():
            async with openai.AsyncOpenAI(base_url=srv.base + "/v1", api_key="x", max_retries=0,
                                          timeout=120) as client:
                return await asyncio.wait_for(asyncio.gather(*(one(client, s) for s in specs)), 300)

        results = asyncio.run(main())
    finally:
        srv.stop()

    model = dgemma.load(ckpt)
    tok = model.tokenizer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server runs with OMP_NUM_THREADS=1: compare like with like
    try:
        check(model, tok, specs, results)
    finally:
        torch.set_num_threads(threads)


def check(model, tok, specs, results) -> None:
    for s, (text, usage, finish) in zip(specs, results):
        if s["chat"]:
            ids = tok.apply_chat_template([{"role": "user", "content": s["prompt"]}], add_generation_prompt=True)
        else:
            ids = tok.encode(s["prompt"])
        want, n = offline_text(model, ids, s["seed"], s["max_tokens"], s["steps"])
        assert text == want, f"request {s['i']} ({'chat' if s['chat'] else 'completion'}) differs from offline"
        assert usage.completion_tokens == n and usage.prompt_tokens == len(ids)
        assert finish == ("length" if n == s["max_tokens"] else "stop")
