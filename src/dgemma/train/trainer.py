"""A plain PyTorch training loop for the diffusion objective; runs as-is under `torchrun` (DDP).

AdamW, linear warm-up + cosine decay, gradient clipping and accumulation, bf16 autocast on CUDA, frozen router,
optional LoRA (merged on export). Checkpoints are HF-format DiffusionGemma directories (`dgemma generate` and
transformers load them) plus `trainer_state.pt`; a rerun with the same `out` resumes from the last one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..api import load
from ..errors import DGemmaError
from .data import TensorData, load_jsonl
from .flops import FlopModel, peak_tflops
from .lora import apply_lora, export_state, lora_state
from .objective import DiffusionObjective, ObjectiveConfig, compile_objective


@dataclass
class TrainConfig:
    model: str = ""  # checkpoint directory to start from
    data: str = ""  # JSONL: {"prompt","completion"} or {"messages"}
    out: str = "runs/train"
    steps: int = 1000
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1.5e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr · this
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.99])
    grad_clip: float = 1.0
    max_len: int = 2048
    append_eos: bool = True
    freeze_router: bool = True
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 32.0
    t_lo: float = 1e-3
    sc_prob: float = 0.5
    ar_weight: float = 1.0
    weighting: str = "none"
    objective: str = "diffusion"  # or "ar": next-token loss on responses only (autoregressive baseline)
    save_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    max_minutes: float = 0.0  # > 0: stop (and save) after this much training time; cosine follows the clock
    compile: bool = False  # torch.compile the objective (CPU: scalar C++ loops, see objective.compile_objective)
    augment: str = "none"  # "sudoku": a fresh random symmetry of every Sudoku example each time it is drawn
    peak_tflops: float = 0.0  # the device's peak for the MFU column (0: the known GPUs' bf16 peak; none on a CPU)
    device: str | None = None
    tensorboard: bool = False

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        raw: dict[str, Any] = {}
        if path is not None:
            raw = _read_config_file(Path(path))
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DGemmaError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.model:
            raise DGemmaError("no model given: set `model` (a checkpoint directory) in the config or --model")
        if not self.data:
            raise DGemmaError("no training data given: set `data` (a JSONL file) in the config or --data")
        for name in ("steps", "batch_size", "grad_accum", "max_len", "save_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise DGemmaError(f"{name}={v!r} is invalid; expected a positive integer")
        if isinstance(self.max_minutes, bool) or not isinstance(self.max_minutes, (int, float)) \
                or not self.max_minutes >= 0:
            raise DGemmaError(f"max_minutes={self.max_minutes!r} is invalid; expected a number >= 0 (0 = no limit)")
        if not isinstance(self.compile, bool):
            raise DGemmaError(f"compile={self.compile!r} is invalid; expected true or false")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise DGemmaError(f"lr={self.lr!r} is invalid; expected a number > 0")
        if not 0 <= self.sc_prob <= 1:
            raise DGemmaError(f"sc_prob={self.sc_prob!r} is invalid; expected a probability in [0, 1]")
        if not 0 < self.t_lo < 1:
            raise DGemmaError(f"t_lo={self.t_lo!r} is invalid; expected a number in (0, 1)")
        if self.objective not in ("diffusion", "ar"):
            raise DGemmaError(f"objective={self.objective!r} is invalid; expected 'diffusion' or 'ar'")
        if self.weighting not in ("none", "inv_1mt"):
            raise DGemmaError(f"weighting={self.weighting!r} is invalid; expected 'none' or 'inv_1mt'")
        if self.augment not in ("none", "sudoku"):
            raise DGemmaError(f"augment={self.augment!r} is invalid; expected 'none' or 'sudoku'")
        if isinstance(self.peak_tflops, bool) or not isinstance(self.peak_tflops, (int, float)) \
                or not self.peak_tflops >= 0:
            raise DGemmaError(f"peak_tflops={self.peak_tflops!r} is invalid; expected a number >= 0 (0 = auto)")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DGemmaError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional: PyYAML

            data = yaml.safe_load(text) or {}
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
    except ModuleNotFoundError as e:
        raise DGemmaError(f"{path}: reading this format needs the '{e.name}' package (pip install {e.name})") from None
    except Exception as e:  # parse errors from either library
        raise DGemmaError(f"{path}: cannot parse config ({e})") from None
    if not isinstance(data, dict):
        raise DGemmaError(f"{path}: expected a table/mapping of options at the top level")
    return data


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0, warmup_s: float = 0.0) -> float:
    """Linear warm-up to lr, then cosine decay to lr · min_lr_ratio at `steps` — or, with `max_minutes`, at the
    time limit if that comes first (progress is the larger of the step fraction and the clock fraction of the time
    left after warm-up, `warmup_s` being the training time warm-up took), so a time-boxed run still anneals fully."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.max_minutes > 0:
        budget = 60.0 * cfg.max_minutes - warmup_s
        p = max(p, (elapsed_s - warmup_s) / budget if budget > 0 else 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _quantization_of(model_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # load() reports a missing or bad config with its own message


def train(cfg: TrainConfig, show_progress: bool = True) -> Path:
    """Run (or resume) training; returns the final checkpoint directory."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    qcfg = _quantization_of(cfg.model)
    if qcfg:
        raise DGemmaError(f"{cfg.model} is a quantized checkpoint ({qcfg.get('format', '?')}); training needs float "
                         "weights: train the original bf16/fp32 checkpoint (LoRA over a frozen quantized base is "
                         "not supported yet), then `dgemma quantize` the result")
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    model = load(cfg.model, dtype=torch.float32, device=device)  # fp32 master weights
    bb = model.backbone
    bb.train()
    bb.requires_grad_(True)
    if cfg.freeze_router:
        for layer in bb.layers:
            layer.router.requires_grad_(False)
    if cfg.lora_rank > 0:
        apply_lora(bb, cfg.lora_rank, cfg.lora_alpha)

    state_path = _last_checkpoint(out)
    start_step = 0
    trainer_state = None
    if state_path is not None:
        trainer_state = torch.load(state_path / "trainer_state.pt", map_location=device, weights_only=False)
        start_step = trainer_state["step"]
        if cfg.lora_rank > 0:
            bb.load_state_dict(trainer_state["lora"], strict=False)
        else:
            resumed = load(state_path, dtype=torch.float32, device=device)
            with torch.no_grad():
                for (n, p), (_, q) in zip(bb.named_parameters(), resumed.backbone.named_parameters()):
                    p.copy_(q)
            del resumed

    examples = load_jsonl(cfg.data, model.tokenizer, max_len=cfg.max_len, append_eos=cfg.append_eos)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    transform = None
    if cfg.augment == "sudoku":
        from ..tasks.sudoku import SymmetryAugment

        augment = SymmetryAugment(model.tokenizer, model.config.text.vocab_size)
        augment.check(examples)

        def transform(ids: torch.Tensor) -> torch.Tensor:
            return augment(ids, gen)
    pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else 0
    data = TensorData(examples, pad, device)  # the ids live on the device: a batch is one gather there
    del examples
    objective = DiffusionObjective(bb, ObjectiveConfig(cfg.t_lo, cfg.sc_prob, cfg.ar_weight, cfg.weighting,
                                                        mode=cfg.objective))
    wrapped: torch.nn.Module = objective
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[local] if device.type == "cuda" else None)
    prefix_only = cfg.objective == "diffusion" and cfg.ar_weight == 0  # nothing reads the rest: a shorter encode
    run = compile_objective(wrapped, device) if cfg.compile else wrapped  # the MoE's grouped GEMM stays eager
    params = [p for p in bb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")  # one kernel per step on CUDA
    flop_model = FlopModel.of(bb)
    peak = cfg.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []  # the rest of this rank's current epoch
    if trainer_state is not None:
        opt.load_state_dict(trainer_state["optimizer"])
        mine = trainer_state["ranks"][rank] if rank < len(trainer_state["ranks"]) else trainer_state["ranks"][0]
        gen.set_state(mine["gen"].cpu())  # generator states are CPU byte tensors whatever the device
        data_gen.set_state(mine["data_gen"])
        order = list(mine["order"])

    L = model.config.canvas_length
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast; restored on return
    prior_s = float(trainer_state.get("elapsed_s", 0.0)) if trainer_state is not None else 0.0
    warmup_s = float(trainer_state.get("warmup_s", 0.0)) if trainer_state is not None else 0.0
    log_f, writer, tb = None, None, None
    if rank == 0:
        header = ["step", "loss", "diffusion_loss", "ar_loss", "canvas_accuracy", "lr", "tokens_per_s",
                  "elapsed_s", "tflops", "mfu"]
        new = not (out / "metrics.csv").exists()
        if not new:  # a run resumed from before the FLOP columns existed keeps its columns
            with open(out / "metrics.csv") as fh:
                columns = len(fh.readline().strip().split(","))
        log_f = open(out / "metrics.csv", "a", newline="")
        writer = csv.writer(log_f)
        if new:
            writer.writerow(header)
            columns = len(header)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tb"))
    progress = _Progress(cfg.steps, start_step, enabled=show_progress and rank == 0)
    t0, tokens, flops, acc, acc_steps = time.perf_counter(), 0, 0.0, {}, 0
    step, done, trained_s, saved_at = start_step, start_step, prior_s, start_step

    def save(at: int) -> None:
        _save(model, bb, opt, {"gen": gen.get_state(), "data_gen": data_gen.get_state(), "order": list(order)},
              at, out, cfg, rank, prior_s + time.perf_counter() - t0, warmup_s)

    try:
        for step in range(start_step, cfg.steps):
            if cfg.max_minutes > 0 and (world == 1 or step == start_step or step % cfg.log_every == 0
                                        or step == cfg.warmup_steps):
                # one process: the clock every step; DDP: rank 0's clock, shared every log_every steps (one
                # broadcast, not one per step)
                trained_s = _clock(prior_s + time.perf_counter() - t0, device)
                if step == cfg.warmup_steps and warmup_s == 0.0:
                    warmup_s = trained_s
                if trained_s >= 60.0 * cfg.max_minutes and step > start_step:
                    break
            lr = lr_at(step, cfg, trained_s, warmup_s)
            for g in opt.param_groups:
                g["lr"] = lr
            for micro in range(cfg.grad_accum):
                idx = []
                while len(idx) < cfg.batch_size:
                    if not order:
                        perm = torch.randperm(len(data), generator=data_gen).tolist()
                        order = perm[rank::world] or perm
                    idx.append(order.pop())
                batch = data.batch(idx, L, data_gen, transform)
                tokens += batch.tokens  # counted on the host: no sync
                if prefix_only:
                    batch = batch.prefix_only()
                flops += flop_model.step(len(idx), batch.ids.shape[1], L, (batch.span[0] + batch.span[1] - L) / 2,
                                         cfg.objective, ar_head=cfg.objective == "diffusion" and cfg.ar_weight > 0)
                sync = world == 1 or micro == cfg.grad_accum - 1
                ctx = wrapped.no_sync() if not sync else _null()
                with ctx, autocast:
                    res = run(batch, gen)
                    (res["loss"] / cfg.grad_accum).backward()
                for k, v in res.items():  # kept on the device until the next log line
                    acc[k] = acc.get(k, 0.0) + v.detach().float() / cfg.grad_accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            acc_steps += 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                mean = {k: float(v) / acc_steps for k, v in acc.items()}
                elapsed = time.perf_counter() - t0
                tps = tokens * world / max(elapsed, 1e-9)
                tflops = flops * world / max(elapsed, 1e-9) / 1e12  # the whole job's model FLOP/s
                if writer is not None:
                    writer.writerow([done, f"{mean.get('loss', 0):.5f}", f"{mean.get('diffusion_loss', 0):.5f}",
                                     f"{mean.get('ar_loss', 0):.5f}", f"{mean.get('canvas_accuracy', 0):.4f}",
                                     f"{lr:.3e}", f"{tps:.0f}", f"{elapsed:.1f}", f"{tflops:.4g}",
                                     f"{tflops / (peak * world):.4f}" if peak else ""][:columns])
                    log_f.flush()
                if tb is not None:
                    for k, v in mean.items():
                        tb.add_scalar(k, v, done)
                progress.update(done, mean.get("loss", 0.0), tps)
                acc, acc_steps = {}, 0
            if done % cfg.save_every == 0 or done == cfg.steps:
                save(done)
                saved_at = done
        if done < cfg.steps and saved_at != done:  # stopped by max_minutes (the same decision on every rank)
            save(done)
            if rank == 0:
                print(f"max_minutes={cfg.max_minutes} reached after {done} steps; saved checkpoint-{done}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        progress.close()
        if log_f is not None:
            log_f.close()
        if tb is not None:
            tb.close()
    if world > 1:
        dist.barrier()
    return out / f"checkpoint-{done}"


def _clock(seconds: float, device: torch.device) -> float:
    """Training time as rank 0 sees it, so every rank takes the same learning rate and stops at the same step."""
    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t)


def _save(model, bb, opt, rank_state: dict, step: int, out: Path, cfg: TrainConfig, rank: int,
          elapsed_s: float = 0.0, warmup_s: float = 0.0) -> None:
    """Rank 0 writes the checkpoint; every rank's RNG and data-order state is gathered into it so a resume
    continues each rank's streams exactly."""
    ranks = [rank_state]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in rank_state.items()})
    if rank == 0:
        from ..api import save_model

        d = out / f"checkpoint-{step}"
        tmp = out / f".checkpoint-{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(model, tmp, state=export_state(bb))
        torch.save({"step": step, "optimizer": opt.state_dict(), "ranks": ranks, "elapsed_s": elapsed_s, "warmup_s": warmup_s,
                    "lora": lora_state(bb) if cfg.lora_rank > 0 else None, "config": asdict(cfg)},
                   tmp / "trainer_state.pt")
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
        (out / "last").write_text(d.name + "\n")
        kept = sorted((p for p in out.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in kept[: max(0, len(kept) - cfg.keep_checkpoints)]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def _last_checkpoint(out: Path) -> Path | None:
    marker = out / "last"
    if marker.is_file():
        d = out / marker.read_text().strip()
        if (d / "trainer_state.pt").is_file():
            return d
    return None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Progress:
    """A rich progress bar with loss and tokens/s (rank 0 only)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                              TimeRemainingColumn(), transient=False)
            self.task = self.p.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
            self.p.start()

    def update(self, done: int, loss: float, tps: float) -> None:
        if self.p is not None:
            self.p.update(self.task, completed=done, loss=loss, tps=tps)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
