"""The `dgemma` command line (`dgemma.cli.main` in-process, plus one real run of the console script)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from rich.console import Console

import dgemma
from dgemma import cli
from dgemma.presets import init_checkpoint
from dgemma.watch import CanvasWatcher

FAST = ["--max-new-tokens", "16", "--steps", "8"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return init_checkpoint("tiny", tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def model(ckpt):
    return dgemma.load(ckpt)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def api_completion(model, ids: list[int], **kwargs) -> tuple[str, list[int]]:
    """What the CLI should print: new ids, pad removed, cut after the first EOS, decoded without specials."""
    out = model.generate(torch.tensor([ids]), **kwargs)
    gcfg = model.generation_config
    new: list[int] = []
    for t in out.sequences[0, len(ids):].tolist():
        if t == gcfg.pad_token_id:
            continue
        new.append(t)
        if t in gcfg.eos_ids:
            break
    return model.tokenizer.decode(new, skip_special_tokens=True), new


# ---------------------------------------------------------------------------------------------------- generate
def test_generate_plain_is_reproducible_and_matches_api(capsys, ckpt, model):
    rc1, out1, err1 = run(capsys, "generate", "--model", ckpt, *FAST, "--seed", "5", "Hello there")
    rc2, out2, _ = run(capsys, "generate", "--model", ckpt, *FAST, "--seed", "5", "Hello there")
    assert rc1 == rc2 == 0 and out1 == out2
    text, _ = api_completion(model, model.tokenizer.encode("Hello there"), seed=5, max_new_tokens=16,
                             max_denoising_steps=8)
    assert out1 == text + "\n"
    assert "1 canvas" in err1 and "8 denoising steps" in err1 and "seed 5" in err1 and "tok/s" in err1


def test_generate_chat_matches_api(capsys, ckpt, model):
    argv = ["generate", "--model", ckpt, *FAST, "--seed", "7", "--chat", "--system", "Be brief.", "Hi!"]
    rc1, out1, _ = run(capsys, *argv)
    rc2, out2, _ = run(capsys, *argv)
    assert rc1 == rc2 == 0 and out1 == out2
    assert 106 in model.generation_config.eos_ids  # <end_of_turn> already stops generation; the CLI adds nothing
    ids = model.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    text, _ = api_completion(model, ids, seed=7, max_new_tokens=16, max_denoising_steps=8)
    assert out1 == text + "\n"


def test_generate_json(capsys, ckpt, model):
    rc, out, err = run(capsys, "generate", "--model", ckpt, *FAST, "--seed", "3", "--json", "Once upon")
    assert rc == 0 and err == ""
    rec = json.loads(out)
    for key in ("prompt", "completion", "completion_ids", "finish_reason", "seed", "canvases", "steps_per_canvas",
                "tokens_per_forward", "revisions", "elapsed_s", "tokens_per_s", "settings"):
        assert key in rec, key
    text, ids = api_completion(model, model.tokenizer.encode("Once upon"), seed=3, max_new_tokens=16,
                               max_denoising_steps=8)
    assert rec["completion_ids"] == ids and rec["completion"] == text
    assert rec["prompt"] == "Once upon" and rec["seed"] == 3 and rec["canvases"] == len(rec["steps_per_canvas"])
    s = rec["settings"]
    assert s["max_new_tokens"] == 16 and s["max_denoising_steps"] == 8 and s["t_min"] == 0.4
    assert s["eos_token_id"] == [1, 106] and s["dtype"] == "float32"


def test_random_seed_is_reported(capsys, ckpt):
    rc, out, _ = run(capsys, "generate", "--model", ckpt, *FAST, "--json", "Hi")
    seed = json.loads(out)["seed"]
    rc2, out2, _ = run(capsys, "generate", "--model", ckpt, *FAST, "--json", "--seed", seed, "Hi")
    assert rc == rc2 == 0 and json.loads(out2)["completion_ids"] == json.loads(out)["completion_ids"]


def test_trim_and_stop(capsys, ckpt):
    argv = ["generate", "--model", ckpt, "--max-new-tokens", "20", "--steps", "8", "--seed", "1", "--json"]
    full = json.loads(run(capsys, *argv, "Hello")[1])
    assert full["generated_tokens"] == 32 and full["canvases"] == 2  # whole canvases of 16
    trimmed = json.loads(run(capsys, *argv, "--trim", "Hello")[1])
    assert trimmed["generated_tokens"] == 20 and trimmed["completion_ids"] == full["completion_ids"][:20]
    # a stop string from the completion's last plain word (not from a byte-fallback piece decoded as U+FFFD)
    stop = next(w for w in reversed(full["completion"].split()) if len(w) >= 3 and w.isascii() and w.isalpha())[:3]
    stopped = json.loads(run(capsys, *argv, "--stop", stop, "Hello")[1])
    assert stopped["finish_reason"] == "stop" and stop not in stopped["completion"]
    assert stopped["settings"]["stop"] == [stop]


@pytest.mark.parametrize("arg", [None, "-"])
def test_prompt_from_stdin(capsys, monkeypatch, ckpt, arg):
    expected = run(capsys, "generate", "--model", ckpt, *FAST, "--seed", "2", "Hello")[1]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    rc, out, _ = run(capsys, "generate", "--model", ckpt, *FAST, "--seed", "2", *([arg] if arg else []))
    assert rc == 0 and out == expected


def test_quiet_has_no_stats(capsys, ckpt):
    rc, out, err = run(capsys, "generate", "--model", ckpt, *FAST, "--seed", "2", "--quiet", "Hello")
    assert rc == 0 and out and err == ""


# ------------------------------------------------------------------------------------------------------ watch
def test_generate_watch(capsys, ckpt):
    plain = run(capsys, "generate", "--model", ckpt, *FAST, "--seed", "4", "Hello")[1]
    rc, out, err = run(capsys, "generate", "--model", ckpt, *FAST, "--seed", "4", "--watch", "Hello")
    assert rc == 0 and out == plain  # the view goes to stderr; the completion is unchanged
    assert "canvas 1 · step 8/8" in err and "accepted" in err and "mean H" in err
    assert err.strip().splitlines()[-1].startswith("1 canvas")  # stats line after the view


def test_watcher_live_terminal(model):
    """On a terminal the watcher animates with rich Live and shows header, committed text and canvas."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100, height=30, color_system="standard")
    steps: list[int] = []
    with CanvasWatcher(model.tokenizer, console, prompt="Hello", refresh_per_second=50, transient=False) as w:
        assert w.animated
        model.generate(torch.tensor([model.tokenizer.encode("Hello")]), seed=0, max_new_tokens=32,
                       max_denoising_steps=8, on_step=lambda i: (steps.append(i.step), w.on_step(i)),
                       on_canvas=w.on_canvas)
    text = buf.getvalue()
    assert "step 8/8" in text and "canvas 2" in text and "\x1b[" in text  # styled
    assert w.canvases_done == 2 and len(w.committed_ids) == 32
    view = w.current_view()
    assert view is not None and view.max_steps == 8 and len(view.tokens) == 16


def test_watcher_plain_console(model):
    """Off a terminal: one plain frame per canvas, no escape codes."""
    buf = io.StringIO()
    w = CanvasWatcher(model.tokenizer, Console(file=buf, force_terminal=False, width=80))
    with w:
        model.generate(torch.tensor([model.tokenizer.encode("Hi")]), seed=0, max_new_tokens=32,
                       max_denoising_steps=8, on_step=w.on_step, on_canvas=w.on_canvas)
    text = buf.getvalue()
    assert "canvas 1 · step 8/8" in text and "canvas 2 · step 8/8" in text and "\x1b[" not in text
    frame = Console(file=io.StringIO(), record=True, width=80)
    frame.print(w.render())  # the last frame: header, committed text, canvas
    assert "canvas 2 · step 8/8" in frame.export_text()
    fresh = CanvasWatcher(model.tokenizer, Console(file=io.StringIO()))
    assert "waiting" in fresh.render().plain


# ------------------------------------------------------------------------------------------------------- info
def test_info_text(capsys, ckpt):
    rc, out, err = run(capsys, "info", ckpt)
    assert rc == 0 and err == ""
    assert "4 layers: 2 sliding (head_dim 16, 2 KV heads, window 32), 2 full (head_dim 32, 1 KV head)" in out
    counts = dgemma.ModelConfig.from_file(ckpt / "config.json").text.param_counts()
    assert f"{counts['total']:,}" in out and f"{counts['active']:,}" in out
    assert "4 experts, top-2" in out and "tokenizer       yes" in out and "KV cache" in out


def test_info_json(capsys, ckpt):
    rc, out, _ = run(capsys, "info", ckpt, "--json")
    assert rc == 0
    s = json.loads(out)
    t = dgemma.ModelConfig.from_file(ckpt / "config.json").text
    counts = t.param_counts()
    assert s["parameters"] == counts
    w = s["weight_bytes"]
    assert (w["float32"], w["bfloat16"]) == (4 * counts["total"], 2 * counts["total"])
    assert counts["total"] < w["fp8"] < w["bfloat16"] and counts["total"] // 2 < w["int4"] < w["fp8"]
    assert s["quantization"] is None
    # 2 sliding layers: 2·2·16·4 bytes each; 2 full: 2·1·32·4 bytes each (fp32 checkpoint)
    assert s["kv_cache"]["sliding_bytes_per_token"] == 2 * (2 * 2 * 16 * 4)
    assert s["kv_cache"]["full_bytes_per_token"] == 2 * (2 * 1 * 32 * 4)
    assert s["kv_cache"]["sliding_tokens_needed"] == 31
    assert s["experts"] == {"num_experts": 4, "top_k": 2, "moe_intermediate_size": 32}
    assert s["canvas_length"] == 16 and s["vocab_size"] == 1024 and s["dtype"] == "float32"
    assert s["generation_config"]["max_denoising_steps"] == 48 and s["tokenizer"] and s["chat_template"]


def test_info_reads_no_weights(capsys, tmp_path):
    """info works from config.json alone (so it is instant for a 50 GB checkpoint): the 26b-a4b preset."""
    from dgemma.presets import preset_config

    cfg, gcfg = preset_config("26b-a4b")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "generation_config.json").write_text(json.dumps(gcfg.to_hf_dict()))
    rc, out, _ = run(capsys, "info", tmp_path)
    assert rc == 0
    assert "30 layers: 25 sliding (head_dim 256, 8 KV heads, window 1024), 5 full (head_dim 512, 2 KV heads)" in out
    assert "128 experts, top-8" in out and "tokenizer       no" in out


# ------------------------------------------------------------------------------------------------------- init
def test_init_writes_loadable_checkpoint(capsys, tmp_path):
    out_dir = tmp_path / "new"
    rc, out, err = run(capsys, "init", "--preset", "tiny", out_dir, "--seed", "1")
    assert rc == 0, err
    assert "tiny" in out and "MiB" in out
    m = dgemma.load(out_dir)
    assert m.config.canvas_length == 16 and m.tokenizer is not None

    rc, _, err = run(capsys, "init", "--preset", "tiny", out_dir)
    assert rc == 2 and "error:" in err and "not empty" in err and "--force" in err

    rc, _, err = run(capsys, "init", "--preset", "tiny", out_dir, "--force", "--dtype", "bfloat16")
    assert rc == 0, err
    assert dgemma.load(out_dir).dtype == torch.bfloat16


def test_init_checks_disk_space(capsys, monkeypatch, tmp_path):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**6, 0, 10**6))
    rc, out, err = run(capsys, "init", "--preset", "26b-a4b", tmp_path / "big")
    assert rc == 2 and "not enough free disk space" in err and "Traceback" not in err
    assert "GB" in out and not (tmp_path / "big").exists()


def test_preset_size_26b():
    nbytes, params, dtype = cli.preset_size("26b-a4b", None)
    assert dtype == "bfloat16" and nbytes == 2 * params and 49e9 < nbytes < 52e9


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "{tmp}/missing", "hi"], "no such directory"),
    (["generate", "--model", "{file}", "hi"], "not a checkpoint directory"),
    (["info", "{file}"], "not a checkpoint directory"),
    (["info", "{notckpt}"], "model_type"),
    (["init", "--preset", "huge", "{tmp}/x"], "invalid choice: 'huge'"),
    (["init", "--preset", "tiny", "{file}/sub"], "Not a directory"),
    (["generate", "--model", "{ckpt}", "--steps", "0", "hi"], "max_denoising_steps=0 is invalid"),
    (["generate", "--model", "{ckpt}", "--t-min", "0.9", "--t-max", "0.5", "hi"],
     "t_max=0.5 is invalid; expected a number > t_min (0.9)"),
    (["generate", "--model", "{ckpt}", "--max-new-tokens", "-3", "hi"], "max_new_tokens=-3 is invalid"),
    (["generate", "--model", "{ckpt}", "--dtype", "nonsense", "hi"], "invalid choice: 'nonsense'"),
    (["generate", "--model", "{ckpt}", "--steps", "many", "hi"], "invalid int value"),
    (["generate", "--model", "{ckpt}", "--device", "warp-drive", "hi"], "unknown device"),
    (["generate", "hi"], "--model"),
    ([], "COMMAND"),
])
def test_errors(capsys, tmp_path, ckpt, argv, message):
    (tmp_path / "file.bin").write_text("not a checkpoint")
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "config.json").write_text('{"model_type": "llama"}')
    subst = {"tmp": tmp_path, "file": tmp_path / "file.bin", "notckpt": tmp_path / "notckpt", "ckpt": ckpt}
    rc, _, err = run(capsys, *[a.format(**subst) for a in argv])
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
    if argv:
        assert "error:" in err


def test_keyboard_interrupt(capsys, monkeypatch, ckpt):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    rc, _, err = run(capsys, "info", ckpt)
    assert rc == 130 and "Traceback" not in err


def test_help(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for word in ("block text-diffusion", "generate", "info", "init", "dgemma generate --model"):
        assert word in out


# --------------------------------------------------------------------------------------------- console script
def test_console_script(capsys, ckpt):
    """The installed `dgemma` entry point (or `python -m dgemma`) runs and prints what main() prints."""
    script = Path(sys.executable).parent / "dgemma"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dgemma"]
    argv = ["generate", "--model", str(ckpt), *FAST, "--seed", "9", "Hello"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == run(capsys, *argv)[1]
    assert "seed 9" in proc.stderr and "Traceback" not in proc.stderr
