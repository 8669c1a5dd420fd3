"""The `dgemma` command line: `generate`, `info` and `init`.

Every user-facing failure (a `DGemmaError`, or an OSError for a path) is printed as `error: <message>` on stderr
with exit status 2 and no traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .config import GenerationConfig, ModelConfig
from .errors import CheckpointError, ConfigError, DGemmaError

DTYPE_CHOICES = ("float32", "bfloat16", "float16")

DESCRIPTION = """\
dgemma: DiffusionGemma in plain PyTorch.

DiffusionGemma is a block text-diffusion model. A causal encoder reads the prompt into a KV cache;
a bidirectional decoder then refines a "canvas" of L random tokens over up to N denoising steps,
accepting low-entropy positions and re-noising the rest, and stops early once the canvas is stable
and confident. The canvas is committed and the next one starts, until EOS or --max-new-tokens.
"""

EPILOG = """\
examples:
  dgemma init --preset tiny ./tiny                     write a small random checkpoint to try things on
  dgemma info ./tiny                                   summarise a checkpoint (reads config.json only)
  dgemma generate --model ./tiny "Once upon a time"    complete a prompt
  dgemma generate --model ./ckpt --chat --watch "Why is the sky blue?"
  echo "Hello" | dgemma generate --model ./tiny --json --seed 0
  dgemma serve --model ./tiny --port 8000              OpenAI-compatible server on 127.0.0.1:8000

run `dgemma COMMAND --help` for the options of each command.
"""

# GenerationConfig field -> the flag that sets it (to point error messages at the flag).
FLAG_FOR_FIELD = {
    "max_new_tokens": "--max-new-tokens", "max_denoising_steps": "--steps", "entropy_bound": "--entropy-bound",
    "t_min": "--t-min", "t_max": "--t-max", "stability_threshold": "--stability-threshold",
    "confidence_threshold": "--confidence-threshold",
}


# ===========================================================================================================
# argument parsing
# ===========================================================================================================
def build_parser() -> argparse.ArgumentParser:
    """The `dgemma` argument parser with its three subcommands."""
    parser = argparse.ArgumentParser(prog="dgemma", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dgemma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _add_generate(sub)
    _add_info(sub)
    _add_init(sub)
    _add_serve(sub)
    _add_train(sub)
    _add_sudoku(sub)
    _add_bench(sub)
    _add_quantize(sub)
    return parser


def _add_quantize(sub: Any) -> None:
    p = sub.add_parser(
        "quantize", help="write an FP8 or int4 copy of a checkpoint (e.g. dgemma quantize ./ckpt ./ckpt-int4 "
                         "--format int4)",
        description="Quantize a float checkpoint's attention, MLP and expert matrices to FP8 (e4m3, one scale per "
                    "output channel) or int4 (symmetric, one bf16 scale per group of input columns, two weights "
                    "per byte); the embedding (also the tied head), norms, router and scalars keep their dtype. "
                    "Streams tensor by tensor: the float model is never whole in memory. The output is an "
                    "HF-style directory (config.json gains a quantization_config) that dgemma load / generate / "
                    "serve / bench read. See docs/quantization.md.",
        epilog="examples:\n  dgemma quantize ./ckpt ./ckpt-fp8 --format fp8\n"
               "  dgemma quantize ./ckpt ./ckpt-int4 --format int4 --group-size 64",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="IN", help="float checkpoint directory (bf16 / fp16 / fp32)")
    p.add_argument("out", metavar="OUT", help="output directory (must be empty or missing unless --force)")
    p.add_argument("--format", required=True, choices=("fp8", "int4"), help="weight format")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="int4: input columns per scale; must divide every quantized matrix's input dimension "
                        "(default: per tensor, the largest of 128, 64, 32 that divides it)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT, replacing its checkpoint")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import quant

    src = checkpoint_dir(args.src)
    out = Path(args.out)
    if out.exists() and out.resolve() == src.resolve():
        raise DGemmaError("OUT must be a different directory from IN")
    _check_out_dir(out, args.force)
    plan = quant.plan_quantize(src, quant.Scheme(args.format, args.group_size))
    print(f"quantizing {src} to {args.format} in {out}: {human_bytes(plan.in_bytes)} -> "
          f"{human_bytes(plan.out_bytes)} of weights")
    _check_free_space(out, plan.out_bytes, reclaimable=_reclaimable_bytes(out) if args.force else 0)
    progress, finish = _byte_progress(plan.out_bytes, label="quantizing")
    t0 = time.perf_counter()
    try:
        quant.quantize_checkpoint(plan, out, progress=progress)
    finally:
        finish()
    print(f"done in {time.perf_counter() - t0:.1f} s. try: dgemma info {out}   or   dgemma generate --model {out} "
          "\"Hello\"")
    return 0


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a prompt (e.g. dgemma generate --model ./ckpt \"Hello\")",
        description="Generate a completion of PROMPT with a DiffusionGemma checkpoint. The completion goes to "
                    "stdout; a stats line (canvases, denoising steps, tokens/forward, tok/s, seed) goes to stderr. "
                    "Sampler settings not given come from the checkpoint's generation_config.json.",
        epilog="examples:\n  dgemma generate --model ./ckpt \"Once upon a time\"\n"
               "  dgemma generate --model ./ckpt --chat --system \"Be brief.\" --watch \"Why is the sky blue?\"\n"
               "  cat prompt.txt | dgemma generate --model ./ckpt --json --seed 0 > out.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", required=True, metavar="DIR", help="checkpoint directory (HF format)")
    p.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="the prompt; read from stdin when omitted or '-'")
    g = p.add_argument_group("prompt format")
    g.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user message in the checkpoint's chat template")
    g.add_argument("--system", metavar="TEXT", help="a system message before the user message (implies --chat)")
    s = p.add_argument_group("sampler (defaults: the checkpoint's generation_config.json)")
    s.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate (rounded up to whole "
                   "canvases unless --trim)")
    s.add_argument("--steps", type=int, metavar="N", dest="max_denoising_steps",
                   help="maximum denoising steps per canvas")
    s.add_argument("--entropy-bound", type=float, metavar="X", help="entropy budget for accepting positions")
    s.add_argument("--t-min", type=float, metavar="T", help="temperature at the last step")
    s.add_argument("--t-max", type=float, metavar="T", help="temperature at the first step")
    s.add_argument("--stability-threshold", type=int, metavar="S",
                   help="steps the argmax canvas must stay unchanged to stop early")
    s.add_argument("--confidence-threshold", type=float, metavar="X",
                   help="mean entropy below which a stable canvas stops early")
    s.add_argument("--seed", type=int, metavar="N", help="random seed (default: random; the seed used is printed)")
    s.add_argument("--stop", action="append", metavar="STR", default=[],
                   help="stop at this string (repeatable)")
    s.add_argument("--trim", action="store_true", help="return exactly --max-new-tokens tokens, not whole canvases")
    s.add_argument("--sampler", choices=("fast", "reference"), default="fast",
                   help="fast (default): counter-based draws, the batch-invariant fast path; reference: the "
                        "transformers reference's RNG and arithmetic, token for token (slower)")
    s.add_argument("--ar", action="store_true",
                   help="decode autoregressively instead (greedy, one token per forward through the causal encoder "
                        "and the tied head, with the KV cache): the baseline diffusion is compared with")
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", choices=DTYPE_CHOICES, help="compute dtype (default: the checkpoint's)")
    r.add_argument("--device", metavar="DEV", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object with the completion and stats")
    o.add_argument("--watch", action="store_true", help="show each canvas converging live (on stderr)")
    o.add_argument("--quiet", "-q", action="store_true", help="no stats line or progress messages")
    p.set_defaults(func=cmd_generate)


def _add_bench(sub: Any) -> None:
    from .presets import PRESETS

    p = sub.add_parser(
        "bench", help="measure batch-1 decoding speed: diffusion vs the reference vs AR mode, against the floor",
        description="Time generation on one checkpoint (or a preset with random weights built in memory) in several "
                    "modes: diffusion with 16 and 48 fixed steps per canvas (early stopping off) and adaptive "
                    "(the checkpoint's sampler settings), dgemma's autoregressive mode (greedy, KV cache) and, when "
                    "transformers is installed and --model is given, the transformers reference on the same "
                    "checkpoint and seed (its tokens are compared with dgemma's). Reports tok/s, time to first "
                    "token, prefill, ms per decoder pass, per-canvas latency, tokens per forward, peak memory, and "
                    "the weight-read floor (bytes of weights a pass reads / measured memory bandwidth).",
        epilog="examples:\n  dgemma init --preset small ./small && dgemma bench --model ./small\n"
               "  dgemma bench --random-weights --preset 26b-a4b --prompt-len 4096 --modes fixed16,ar --json out.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "-m", metavar="DIR", help="checkpoint directory")
    src.add_argument("--random-weights", action="store_true",
                     help="build --preset's architecture with random weights on the device (no files)")
    p.add_argument("--preset", choices=list(PRESETS), help="architecture for --random-weights")
    p.add_argument("--modes", default="fixed16,fixed48,adaptive,ar", metavar="LIST",
                   help="comma-separated: fixed16, fixed48, adaptive, ar (default: all)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference")
    p.add_argument("--sampler", choices=("fast", "reference"), default="fast",
                   help="dgemma's sampler (default fast); with 'reference' its tokens are compared with the "
                        "transformers reference's")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the fast step (auto: DGEMMA_COMPILE, else on for CUDA, off for a CPU); "
                        "the compile time is reported apart from the timed runs")
    p.add_argument("--prompt-len", type=int, default=128, metavar="N", help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=256, metavar="N", help="tokens to generate (default 256)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--repeats", type=int, default=2, metavar="R",
                   help="timed runs per mode after one warm-up; the median is reported (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for the prompt and the sampler (default 0)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="compute dtype (default: the checkpoint's; random "
                   "weights: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", metavar="DEV", help="e.g. cpu, cuda (default: cuda if available)")
    p.add_argument("--format", choices=("fp8", "int4"),
                   help="quantize the matrices (random weights: as they are drawn; --model: while loading)")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON to FILE ('-' = stdout only)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import ALL_MODES, format_table, random_model, run_bench, save_json

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise DGemmaError(f"unknown mode(s) {', '.join(bad) or '(none given)'}; expected a comma-separated list of "
                          f"{', '.join(ALL_MODES)}")
    for name in ("prompt_len", "new_tokens", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise DGemmaError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.random_weights and not args.preset:
        raise DGemmaError("--random-weights needs --preset (e.g. --preset 26b-a4b)")
    if args.preset and not args.random_weights:
        raise DGemmaError("--preset is only for --random-weights; with --model the checkpoint's architecture is used")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    reference = None
    if args.random_weights:
        model = random_model(args.preset, args.device, args.dtype, seed=args.seed, quantize=args.format)
    else:
        d = checkpoint_dir(args.model)
        model = _load_model(d, args, quantize=args.format)
        if model.config.quantization_config and not args.no_reference:
            print("bench: quantized weights; skipping the float transformers reference", file=sys.stderr)
        elif not args.no_reference and any(m != "ar" for m in modes):
            reference = _load_reference(d, model)
    limit = model.config.text.max_position_embeddings
    if args.prompt_len + args.new_tokens + model.config.canvas_length > limit:
        raise DGemmaError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} (+ one canvas) exceeds "
                          f"the model's {limit} positions")
    report = run_bench(model, modes=modes, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       batch=args.batch, repeats=args.repeats, seed=args.seed, reference=reference,
                       sampler=args.sampler, compile={"auto": None, "on": True, "off": False}[args.compile],
                       progress=lambda m: print(f"bench: {m} ...", file=sys.stderr, flush=True))
    report["command"] = "dgemma " + " ".join(sys.argv[1:])
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _load_reference(d: Path, model: Any) -> Any:
    """The transformers reference on the same checkpoint and dtype, or None when transformers is not installed."""
    try:
        from transformers import DiffusionGemmaForBlockDiffusion
    except ImportError:
        print("bench: transformers is not installed; skipping the reference", file=sys.stderr)
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report lists the vision tower dgemma does not ship
    hf_logging.disable_progress_bar()
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(d, dtype=model.dtype, attn_implementation="eager")
    return ref.to(model.device).eval()


def _add_info(sub: Any) -> None:
    p = sub.add_parser(
        "info", help="summarise a checkpoint without loading its weights (e.g. dgemma info ./ckpt)",
        description="Summarise a checkpoint from its config.json: architecture, parameter counts, weight and KV "
                    "cache memory, generation defaults. Weights are not loaded, so this is instant.")
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_info)


def _add_init(sub: Any) -> None:
    from .presets import PRESETS

    p = sub.add_parser(
        "init", help="write a randomly initialised checkpoint (e.g. dgemma init --preset tiny ./tiny)",
        description="Write a randomly initialised checkpoint of a preset architecture (config, generation config, "
                    "weights, tokenizer) that dgemma and transformers load. Useful for tests and benchmarks; "
                    "the model produces noise.")
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="architecture preset")
    p.add_argument("out", metavar="OUT", help="output directory (must be empty or missing unless --force)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="weight dtype (default: the preset's)")
    p.add_argument("--format", choices=("fp8", "int4"),
                   help="write the matrices quantized (as dgemma quantize would; no float copy is made)")
    p.add_argument("--group-size", type=int, metavar="N", help="int4 group size (default: per tensor, 128/64/32)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT, replacing its checkpoint")
    p.set_defaults(func=cmd_init)


def _add_serve(sub: Any) -> None:
    from .server import add_serve_arguments, run_serve

    p = sub.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (e.g. dgemma serve --model ./ckpt)",
        description="Serve a checkpoint over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics) with continuous batching. Binds 127.0.0.1 by default; "
                    "SIGTERM drains running requests before exiting.")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="fine-tune or train with the diffusion objective (e.g. dgemma train --config sft.toml)",
        description="Train a checkpoint with DiffusionGemma's uniform-state diffusion objective (random-token "
                    "corruption of one canvas per example, two-pass self-conditioning, optional encoder next-token "
                    "loss). Data: JSONL with {\"prompt\", \"completion\"} or chat {\"messages\": [...]}. Options "
                    "come from a TOML/YAML config file, then flags, then --set key=value. Rerunning with the same "
                    "--out resumes from its last checkpoint. Multi-process: torchrun --nproc_per_node N -m dgemma "
                    "train ...")
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of training options (see docs/training.md)")
    p.add_argument("--model", metavar="DIR", help="checkpoint to start from")
    p.add_argument("--data", metavar="FILE", help="training JSONL")
    p.add_argument("--out", metavar="DIR", help="output directory (checkpoints, metrics.csv); resumes if present")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="examples per process per micro-step")
    p.add_argument("--grad-accum", type=int, dest="grad_accum", help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--lora-rank", type=int, dest="lora_rank", help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option, e.g. --set warmup_steps=100 --set sc_prob=0.5 (repeatable)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    over: dict[str, Any] = {k: getattr(args, k) for k in
                            ("model", "data", "out", "steps", "batch_size", "grad_accum", "lr", "lora_rank")}
    for item in args.set:
        if "=" not in item:
            raise DGemmaError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            over[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            over[k.strip()] = v
    cfg = TrainConfig.from_file(args.config, over)
    final = train(cfg, show_progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained checkpoint: {final}", file=sys.stderr)
    return 0


def _add_sudoku(sub: Any) -> None:
    try:
        from .tasks.sudoku import add_sudoku_parser
    except ImportError:  # the task module is optional
        return
    add_sudoku_parser(sub)


# ===========================================================================================================
# entry point
# ===========================================================================================================
def main(argv: Sequence[str] | None = None) -> int:
    """Run the `dgemma` command; returns the exit status (0 ok, 2 usage or user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse already printed "error: ...")
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dgemma generate ... | head -c 10`
        _silence_stdout()
        return 1
    except DGemmaError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(_os_error_message(e))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _os_error_message(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# ===========================================================================================================
# shared helpers
# ===========================================================================================================
def checkpoint_dir(path: str) -> Path:
    """The checkpoint directory `path`, or a DGemmaError saying why it is not one."""
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{d}: no such directory; expected a checkpoint directory (config.json, "
                              "*.safetensors, tokenizer.json)")
    if not d.is_dir():
        raise CheckpointError(f"{d}: is a file, not a checkpoint directory (expected a directory with "
                              "config.json and *.safetensors)")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d}: not a checkpoint directory (no config.json)")
    return d


def checkpoint_generation_config(d: Path, config: ModelConfig | None = None) -> tuple[GenerationConfig, bool]:
    """The checkpoint's generation config (or one built from config.json, as `dgemma.load` does) and whether
    generation_config.json exists."""
    path = d / "generation_config.json"
    if path.is_file():
        return GenerationConfig.from_file(path), True
    config = config or ModelConfig.from_file(d / "config.json")
    return GenerationConfig(eos_token_id=config.text.eos_token_id, pad_token_id=config.text.pad_token_id), False


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def human_count(n: int) -> str:
    """25_800_000_000 -> '25.80B'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


# ===========================================================================================================
# dgemma generate
# ===========================================================================================================
def cmd_generate(args: argparse.Namespace) -> int:
    """Load the model, generate one completion, print it (text or JSON) and the stats."""
    d = checkpoint_dir(args.model)
    if args.ar:
        bad = [f for f in ("watch", "trim") if getattr(args, f)] + (["stop"] if args.stop else []) + (
            ["sampler"] if args.sampler != "fast" else []) + (
            ["seed"] if args.seed is not None else []) + [
            FLAG_FOR_FIELD[n] for n in _sampler_overrides(args) if n != "max_new_tokens"]
        if bad:
            raise DGemmaError(f"--ar decodes greedily one token at a time; it does not take "
                              f"{', '.join(b if b.startswith('--') else '--' + b for b in bad)}")
    overrides = _sampler_overrides(args)
    _validate_sampler(d, overrides)  # fail fast, before loading (possibly many GB of) weights
    prompt = _read_prompt(args)
    chat = args.chat or args.system is not None
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    model = _load_model(d, args)
    tok = model.tokenizer
    ids = _prompt_ids(tok, prompt, chat, args.system)
    gcfg = model.resolve_generation_config(**overrides)
    extra: dict[str, Any] = {}
    eos_ids = list(gcfg.eos_ids)
    eot = tok.token_to_id("<end_of_turn>") if chat else None
    if eot is not None and eot not in eos_ids:  # a chat turn ends at <end_of_turn> (presets list it already)
        eos_ids.append(eot)
        extra["eos_token_id"] = eos_ids

    import torch

    shown_prompt = prompt + "\n" if chat else prompt  # a reply starts on its own line
    watcher = _make_watcher(tok, shown_prompt, gcfg.pad_token_id) if args.watch else None
    t0 = time.perf_counter()
    if args.ar:
        out = model.generate_ar(torch.tensor([ids]), max_new_tokens=gcfg.max_new_tokens,
                                eos_token_id=eos_ids or None)
    elif watcher is not None:
        with watcher:
            out = model.generate(torch.tensor([ids]), seed=seed, trim=args.trim, stop=args.stop or None,
                                 on_step=watcher.on_step, on_canvas=watcher.on_canvas, sampler=args.sampler,
                                 **overrides, **extra)
    else:
        out = model.generate(torch.tensor([ids]), seed=seed, trim=args.trim, stop=args.stop or None,
                             sampler=args.sampler, **overrides, **extra)
    elapsed = time.perf_counter() - t0

    completion = completion_ids(out.sequences[0].tolist(), len(ids), eos_ids, gcfg.pad_token_id)
    text = tok.decode(completion, skip_special_tokens=True)
    stats = _generation_stats(out, completion, elapsed, seed, ar=args.ar)
    if args.json:
        settings = {"max_new_tokens": gcfg.max_new_tokens, "mode": "ar"} if args.ar else dataclasses.asdict(gcfg)
        settings.update(eos_token_id=eos_ids if extra else gcfg.eos_token_id, trim=args.trim, stop=args.stop,
                        sampler=None if args.ar else args.sampler,
                        dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
                        chat=chat, system=args.system)
        record = {"prompt": prompt, "prompt_tokens": len(ids), "completion": text, "completion_ids": completion,
                  **stats, "settings": settings}
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(text, flush=True)
        if not args.quiet:
            print(format_stats(stats), file=sys.stderr)
    return 0


def _sampler_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler flags that were given, as `generate()` keyword arguments."""
    names = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
             "confidence_threshold")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _validate_sampler(d: Path, overrides: dict[str, Any]) -> None:
    """Raise the GenerationConfig validation error for bad flag values, naming the flag."""
    gcfg, _ = checkpoint_generation_config(d)
    try:
        gcfg.merged(**overrides)
    except ConfigError as e:
        msg = str(e)
        field = msg.split("=", 1)[0]
        if field in overrides:
            msg += f" (set by {FLAG_FOR_FIELD[field]})"
        elif field == "t_max" and "t_min" in overrides:
            msg += " (check --t-min / --t-max)"
        else:
            msg = f"{d / 'generation_config.json'}: {msg}"
        raise ConfigError(msg) from None


def _read_prompt(args: argparse.Namespace) -> str:
    """PROMPT, or stdin when it is omitted or '-' (one trailing newline removed)."""
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if sys.stdin is None:
        raise DGemmaError("no PROMPT given and there is no stdin to read it from")
    if sys.stdin.isatty() and not args.quiet:
        print("reading the prompt from stdin (end with Ctrl-D)…", file=sys.stderr)
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def _prompt_ids(tok: Any, prompt: str, chat: bool, system: str | None) -> list[int]:
    """Token ids of the prompt, through the chat template when `chat`."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}]
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise DGemmaError("the prompt is empty and the tokenizer adds no BOS token; give some prompt text")
    return ids


def _load_model(d: Path, args: argparse.Namespace, quantize: str | None = None) -> Any:
    """`dgemma.load` with a spinner on stderr (when it is a terminal)."""
    from rich.console import Console

    from .api import load

    console = Console(stderr=True)
    if getattr(args, "quiet", False) or not console.is_terminal:
        return load(d, dtype=args.dtype, device=args.device, quantize=quantize)
    with console.status(f"loading {d} …"):
        return load(d, dtype=args.dtype, device=args.device, quantize=quantize)


def _make_watcher(tok: Any, prompt: str, pad_token_id: int | None) -> Any:
    from rich.console import Console

    from .watch import CanvasWatcher

    return CanvasWatcher(tok, Console(stderr=True), prompt=prompt, pad_token_id=pad_token_id)


def completion_ids(sequence: list[int], prompt_len: int, eos_ids: Sequence[int], pad_id: int | None) -> list[int]:
    """The generated ids after the prompt, pad removed, cut after the first EOS (which is kept)."""
    out: list[int] = []
    eos = set(eos_ids)
    for t in sequence[prompt_len:]:
        if pad_id is not None and t == pad_id:
            continue
        out.append(t)
        if t in eos:
            break
    return out


def _generation_stats(out: Any, completion: list[int], elapsed: float, seed: int | None,
                      ar: bool = False) -> dict[str, Any]:
    if ar:  # greedy next-token decoding: no canvases, no seed
        return {"mode": "ar", "finish_reason": out.finish_reasons[0], "forwards": int(out.steps_per_canvas[0][0]),
                "tokens_per_forward": 1.0, "generated_tokens": len(completion), "elapsed_s": round(elapsed, 4),
                "tokens_per_s": round(len(completion) / elapsed, 2) if elapsed > 0 else None}
    steps = [int(s) for s in out.steps_per_canvas[0]]
    return {
        "finish_reason": out.finish_reasons[0],
        "seed": seed,
        "canvases": len(steps),
        "denoising_steps": sum(steps),
        "steps_per_canvas": steps,
        "tokens_per_forward": round(float(out.tokens_per_forward[0]), 4),
        "revisions": int(out.revisions[0]) if out.revisions is not None else None,
        "generated_tokens": len(completion),
        "elapsed_s": round(elapsed, 4),
        "tokens_per_s": round(len(completion) / elapsed, 2) if elapsed > 0 else None,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The one-line summary printed on stderr after a completion."""
    tps = stats["tokens_per_s"]
    if stats.get("mode") == "ar":
        return (f"autoregressive (greedy) · {stats['forwards']} forwards · {stats['generated_tokens']} tokens · "
                f"{tps if tps is not None else '-'} tok/s · finish: {stats['finish_reason']}")
    c = stats["canvases"]
    return (f"{c} canvas{'es' if c != 1 else ''} · {stats['denoising_steps']} denoising steps · "
            f"{stats['tokens_per_forward']:.2f} tokens/forward · {stats['generated_tokens']} tokens · "
            f"{tps if tps is not None else '-'} tok/s · finish: {stats['finish_reason']} · seed {stats['seed']}")


# ===========================================================================================================
# dgemma info
# ===========================================================================================================
def cmd_info(args: argparse.Namespace) -> int:
    summary = checkpoint_summary(checkpoint_dir(args.dir))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def checkpoint_summary(d: Path) -> dict[str, Any]:
    """Everything `dgemma info` reports, from config.json / generation_config.json / file listings only."""
    config = ModelConfig.from_file(d / "config.json")
    t = config.text
    gcfg, has_gen_file = checkpoint_generation_config(d, config)
    counts = t.param_counts()
    dtype = config.dtype or _stored_dtype_name(d)
    return {
        "path": str(d),
        "model_type": "diffusion_gemma",
        "dtype": dtype,
        "canvas_length": config.canvas_length,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_attention_heads,
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings,
        "sliding_window": t.sliding_window,
        "experts": {"num_experts": t.num_experts, "top_k": t.top_k_experts,
                    "moe_intermediate_size": t.moe_intermediate_size},
        "layers": {"total": t.num_hidden_layers, "groups": layer_groups(config)},
        "parameters": counts,
        "weight_bytes": weight_bytes_by_format(t),
        "active_weight_bytes": {name: counts["active"] * size
                                for name, size in (("float32", 4), ("bfloat16", 2), ("fp8", 1))},
        "resident_bytes": resident_bytes_by_format(t, RESIDENT_CONTEXT),
        "resident_context": RESIDENT_CONTEXT,
        "quantization": config.quantization_config,
        "kv_cache": kv_cache_summary(config, _dtype_size(dtype)),
        "weights_on_disk": _weights_on_disk(d),
        "generation_config": dataclasses.asdict(gcfg.merged()),
        "generation_config_file": has_gen_file,
        "tokenizer": (d / "tokenizer.json").is_file(),
        "chat_template": _has_chat_template(d),
    }


RESIDENT_CONTEXT = 4096  # the context `dgemma info` states resident memory for


def weight_bytes_by_format(t: Any) -> dict[str, int]:
    """Weight bytes as float32 / bfloat16, and quantized (fp8 / int4 matrices, the rest bf16; see dgemma.quant)."""
    from . import checkpoint, quant

    shapes = checkpoint.expected_shapes(t)
    return {"float32": quant.weight_bytes(shapes, 4, None), "bfloat16": quant.weight_bytes(shapes, 2, None),
            "fp8": quant.weight_bytes(shapes, 2, quant.Scheme("fp8")),
            "int4": quant.weight_bytes(shapes, 2, quant.Scheme("int4"))}


def resident_bytes_by_format(t: Any, context: int) -> dict[str, int]:
    """Weights + one request's bf16 KV cache of `context` tokens. (The KV cache keeps every position in every
    layer today, sliding ones too.)"""
    kv = sum(2 * t.layer_kv_heads(i) * t.layer_head_dim(i) * 2 for i in range(t.num_hidden_layers)) * context
    w = weight_bytes_by_format(t)
    return {name: w[name] + kv for name in ("bfloat16", "fp8", "int4")}


def layer_groups(config: ModelConfig) -> list[dict[str, Any]]:
    """Layers grouped by (type, head_dim, KV heads), sliding groups first."""
    t = config.text
    groups: dict[tuple[str, int, int], int] = {}
    for i in range(t.num_hidden_layers):
        kind = "full" if t.is_full(i) else "sliding"
        key = (kind, t.layer_head_dim(i), t.layer_kv_heads(i))
        groups[key] = groups.get(key, 0) + 1
    out = []
    for (kind, d, g), n in sorted(groups.items(), key=lambda kv: (kv[0][0] != "sliding", kv[0][1:])):
        item: dict[str, Any] = {"type": kind, "count": n, "head_dim": d, "kv_heads": g}
        if kind == "sliding":
            item["window"] = t.sliding_window
        out.append(item)
    return out


def kv_cache_summary(config: ModelConfig, bytes_per_value: int) -> dict[str, Any]:
    """KV cache bytes per token: Σ over layers of 2·kv_heads·head_dim·bytes. Sliding layers only ever need the
    last W−1 positions, so their share stops growing there."""
    t = config.text
    full = sliding = 0
    for i in range(t.num_hidden_layers):
        b = 2 * t.layer_kv_heads(i) * t.layer_head_dim(i) * bytes_per_value
        if t.is_full(i):
            full += b
        else:
            sliding += b
    window_tokens = t.sliding_window - 1
    return {"bytes_per_value": bytes_per_value, "bytes_per_token": full + sliding,
            "full_bytes_per_token": full, "sliding_bytes_per_token": sliding,
            "sliding_tokens_needed": window_tokens, "sliding_max_bytes": sliding * window_tokens}


def kv_bytes_at(kv: dict[str, Any], tokens: int) -> int:
    """KV bytes a context of `tokens` needs when sliding layers keep only their window."""
    return kv["full_bytes_per_token"] * tokens + kv["sliding_bytes_per_token"] * min(tokens,
                                                                                     kv["sliding_tokens_needed"])


def _dtype_size(name: str | None) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(name or "bfloat16", 2)


def _stored_dtype_name(d: Path) -> str | None:
    """The weights' dtype from the safetensors headers (no tensor data is read); None if unreadable."""
    from . import checkpoint

    try:
        return str(checkpoint.stored_dtype(d)).removeprefix("torch.")
    except DGemmaError:
        return None


def _weights_on_disk(d: Path) -> dict[str, int]:
    files = sorted(d.glob("*.safetensors"))
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def _has_chat_template(d: Path) -> bool:
    if (d / "chat_template.jinja").is_file():
        return True
    try:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable `dgemma info` report."""
    p, kv, e = s["parameters"], s["kv_cache"], s["experts"]
    groups = s["layers"]["groups"]
    layer_text = ", ".join(_format_group(g) for g in groups)
    g = s["generation_config"]
    disk = s["weights_on_disk"]
    kv_dtype = {4: "fp32", 2: "16-bit"}[kv["bytes_per_value"]]
    sliding_layers = sum(x["count"] for x in groups if x["type"] == "sliding")
    full_layers = sum(x["count"] for x in groups if x["type"] == "full")
    ctx = sorted({n for n in (4096, 32768, s["max_position_embeddings"]) if n <= s["max_position_embeddings"]})
    lines = [
        f"{s['path']}: {s['model_type']} ({s['dtype'] or 'dtype unknown'})",
        f"  layers          {s['layers']['total']} layers: {layer_text}",
        f"  hidden          {s['hidden_size']} (dense MLP {s['intermediate_size']}), "
        f"{s['num_attention_heads']} attention heads",
        f"  experts         {e['num_experts']} experts, top-{e['top_k']} per token "
        f"(expert MLP {e['moe_intermediate_size']})",
        f"  vocab           {s['vocab_size']:,}",
        f"  canvas_length   {s['canvas_length']} tokens per canvas",
        f"  context         {s['max_position_embeddings']:,} positions",
        f"  parameters      {human_count(p['total'])} total ({p['total']:,}), {human_count(p['active'])} active "
        f"per token ({p['active']:,})",
        f"                  embedding {human_count(p['embedding'])}, attention {human_count(p['attention'])}, "
        f"dense MLP {human_count(p['dense_mlp'])}, experts {human_count(p['experts'])}",
        "  weights         " + ", ".join(f"{n} {human_bytes(b)}" for n, b in
                                         (("fp32", s["weight_bytes"]["float32"]),
                                          ("bf16", s["weight_bytes"]["bfloat16"]),
                                          ("fp8", s["weight_bytes"]["fp8"]),
                                          ("int4", s["weight_bytes"]["int4"]))),
        f"                  active per token (top-K experts): bf16 {human_bytes(s['active_weight_bytes']['bfloat16'])}",
        f"  resident        weights + bf16 KV for {s['resident_context']:,} tokens: " + ", ".join(
            f"{n} {human_bytes(b)}" for n, b in (("bf16", s["resident_bytes"]["bfloat16"]),
                                                  ("fp8", s["resident_bytes"]["fp8"]),
                                                  ("int4", s["resident_bytes"]["int4"]))),
        *([f"  quantized       {s['quantization'].get('format')} (dgemma quantize; matrices only, see "
           "docs/quantization.md)"] if s.get("quantization") else []),
        f"  on disk         {disk['files']} safetensors file{'s' if disk['files'] != 1 else ''}, "
        f"{human_bytes(disk['bytes'])}",
        f"  KV cache        {human_bytes(kv['bytes_per_token'])}/token ({kv_dtype}): "
        f"{human_bytes(kv['full_bytes_per_token'])} in {full_layers} full layers + "
        f"{human_bytes(kv['sliding_bytes_per_token'])} in {sliding_layers} sliding layers",
        f"                  sliding layers need only the last {kv['sliding_tokens_needed']} tokens "
        f"(at most {human_bytes(kv['sliding_max_bytes'])}); total "
        + ", ".join(f"{human_bytes(kv_bytes_at(kv, n))} at {n:,}" for n in ctx),
        f"  generation      max_new_tokens {g['max_new_tokens']}, steps {g['max_denoising_steps']}, "
        f"entropy_bound {g['entropy_bound']}, T {g['t_max']}→{g['t_min']}",
        f"                  stability {g['stability_threshold']}, confidence {g['confidence_threshold']}, "
        f"eos {g['eos_token_id']}, pad {g['pad_token_id']}"
        + ("" if s["generation_config_file"] else "  (no generation_config.json: defaults)"),
        f"  tokenizer       {'yes' if s['tokenizer'] else 'no (generate needs tokenizer.json)'}"
        + (f", chat template {'yes' if s['chat_template'] else 'no'}" if s["tokenizer"] else ""),
    ]
    return "\n".join(lines)


def _format_group(g: dict[str, Any]) -> str:
    heads = f"{g['kv_heads']} KV head{'s' if g['kv_heads'] != 1 else ''}"
    window = f", window {g['window']}" if "window" in g else ""
    return f"{g['count']} {g['type']} (head_dim {g['head_dim']}, {heads}{window})"


# ===========================================================================================================
# dgemma init
# ===========================================================================================================
PROGRESS_MIN_BYTES = 256 * 1024**2  # show a progress bar when writing more than this


def cmd_init(args: argparse.Namespace) -> int:
    """Write a random checkpoint of a preset, after checking OUT and the free disk space."""
    from .presets import init_checkpoint

    from . import quant

    out = Path(args.out)
    _check_out_dir(out, args.force)
    if args.group_size is not None and args.format != "int4":
        raise DGemmaError("--group-size applies to --format int4 only")
    scheme = quant.Scheme(args.format, args.group_size) if args.format else None
    total, params, dtype = preset_size(args.preset, args.dtype, scheme)
    fmt = f", matrices {args.format}" if scheme else ""
    print(f"writing preset {args.preset} ({human_count(params)} parameters, {dtype}{fmt}) to {out}: "
          f"{human_bytes(total)} ({total / 1e9:.2f} GB)")
    _check_free_space(out, total, reclaimable=_reclaimable_bytes(out) if args.force else 0)
    progress, finish = _byte_progress(total)
    try:
        init_checkpoint(args.preset, out, seed=args.seed, dtype=args.dtype, progress=progress, quantize=scheme)
    finally:
        finish()
    print(f"done. try: dgemma info {out}   or   dgemma generate --model {out} \"Hello\"")
    return 0


def preset_size(preset: str, dtype: str | None, scheme: Any = None) -> tuple[int, int, str]:
    """(weight bytes, parameter count, dtype name) of a preset checkpoint, without writing anything."""
    import math

    from . import checkpoint, quant
    from .api import resolve_dtype
    from .presets import preset_config

    cfg, _ = preset_config(preset)
    tdtype = resolve_dtype(dtype, cfg.dtype)
    shapes = checkpoint.expected_shapes(cfg.text)
    numel = sum(math.prod(s) for s in shapes.values())
    return quant.weight_bytes(shapes, tdtype.itemsize, scheme), numel, str(tdtype).removeprefix("torch.")


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DGemmaError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DGemmaError(f"{out} is not empty; choose a new directory or pass --force to write into it "
                          "(its checkpoint files are replaced)")


def _reclaimable_bytes(out: Path) -> int:
    """Bytes of old weight files in OUT that init replaces."""
    if not out.is_dir():
        return 0
    return sum(f.stat().st_size for f in out.glob("model*.safetensors"))


def _check_free_space(out: Path, need: int, reclaimable: int = 0) -> None:
    """Refuse (DGemmaError) when the file system holding OUT lacks `need` bytes plus a small margin."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free + reclaimable
    margin = 64 * 1024**2 + need // 100  # tokenizer, configs, safetensors headers
    if free < need + margin:
        raise DGemmaError(f"not enough free disk space for {out}: the checkpoint needs about "
                          f"{human_bytes(need + margin)} but only {human_bytes(free)} is free")


def _byte_progress(total: int, label: str = "writing weights"
                   ) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A (progress(done, total), finish()) pair drawing a rich bytes bar on stderr for large writes."""
    if total < PROGRESS_MIN_BYTES:
        return None, lambda: None
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True))
    task = bar.add_task("weights", total=total)
    bar.start()

    def progress(done: int, total_: int) -> None:
        bar.update(task, completed=done, total=total_)

    return progress, bar.stop


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
