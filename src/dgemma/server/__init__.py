"""dgemma's OpenAI-compatible HTTP server.

    from dgemma.server import serve
    serve("./ckpt", port=8000)                      # blocks; returns 0 after a graceful shutdown

or `python -m dgemma.server --model ./ckpt`. Endpoints, the streaming format and the drafts extension are
described in `dgemma.server.app`; metrics in `dgemma.server.metrics`.

For the CLI: `add_serve_arguments(parser)` adds the flags of `serve` to an argparse parser and
`run_serve(args)` runs it from the parsed namespace (both import nothing heavy until run).

Shutdown: on SIGTERM or SIGINT the server drains: /health answers 503, new requests get 503 (Retry-After), the
running ones finish (or, after `drain_timeout` seconds, end with an error), then the process exits with status 0.
A second signal exits at once (status 1, requests cut off).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

# fastapi, uvicorn and torch are imported where used, so importing this module (the CLI's parser) stays fast.

__all__ = ["create_app", "serve", "add_serve_arguments", "run_serve", "main"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerMetrics":
        from .metrics import ServerMetrics

        return ServerMetrics
    raise AttributeError(f"module 'dgemma.server' has no attribute {name!r}")


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, max_num_seqs: int = 16,
          max_queue: int = 256, kv_cache_bytes: int | None = None, api_key: str | None = None,
          model_name: str | None = None, dtype: str | None = None, device: str | None = None,
          log_level: str = "info", drain_timeout: float = 30.0) -> int:
    """Load `model_dir`, build the engine and serve it over HTTP until SIGTERM/SIGINT; returns the exit status.

    port=0 picks a free port; the start-up summary's `listening on http://HOST:PORT/v1` line names it.
    model_name: the id clients send as `model` (default: the checkpoint directory's name).
    Raises DGemmaError for user errors (bad checkpoint, port in use, bad options)."""
    import uvicorn

    from ..api import load
    from ..engine import AsyncEngine
    from ..errors import DGemmaError
    from .app import create_app
    from .metrics import ServerMetrics

    level = _check_options(log_level, max_num_seqs, max_queue, kv_cache_bytes, drain_timeout)
    _setup_logging(level)
    sock = _bind(host, port)  # before loading: a busy port fails fast
    try:
        model = load(model_dir, dtype=dtype, device=device)
        try:
            model.tokenizer
        except DGemmaError:
            print("warning: the checkpoint has no tokenizer; only token-id prompts to /v1/completions will work",
                  file=sys.stderr)
        metrics = ServerMetrics()
        engine = AsyncEngine(model, max_num_seqs=max_num_seqs, max_queue=max_queue, kv_cache_bytes=kv_cache_bytes,
                             observer=metrics)
        name = model_name or Path(model_dir).resolve().name or "dgemma"
        app = create_app(engine, model, name, api_key, metrics=metrics, drain_timeout=drain_timeout)
        bound_host, bound_port = sock.getsockname()[:2]
        _print_summary(model, engine, name, model_dir, max_num_seqs, max_queue, api_key, bound_host, bound_port)
        config = uvicorn.Config(app, log_level=level, access_log=level == "debug", lifespan="on", ws="none",
                                timeout_graceful_shutdown=10, timeout_keep_alive=5)
        server = _DrainingServer(config, app)
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("dgemma server: stopped", flush=True)
    return 0


def _check_options(log_level: str, max_num_seqs: int, max_queue: int, kv_cache_bytes: int | None,
                   drain_timeout: float) -> str:
    from ..errors import DGemmaError

    level = str(log_level).lower()
    if level not in ("critical", "error", "warning", "info", "debug"):
        raise DGemmaError(f"log_level {log_level!r} is invalid; expected critical, error, warning, info or debug")
    if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise DGemmaError(f"max_num_seqs={max_num_seqs!r} is invalid; expected a positive integer")
    if not isinstance(max_queue, int) or max_queue < 0:
        raise DGemmaError(f"max_queue={max_queue!r} is invalid; expected an integer >= 0")
    if kv_cache_bytes is not None and (not isinstance(kv_cache_bytes, int) or kv_cache_bytes <= 0):
        raise DGemmaError(f"kv_cache_bytes={kv_cache_bytes!r} is invalid; expected a positive number of bytes")
    if not drain_timeout >= 0:
        raise DGemmaError(f"drain_timeout={drain_timeout!r} is invalid; expected seconds >= 0")
    return level


def _setup_logging(level: str) -> None:
    import logging

    lg = logging.getLogger("dgemma")
    if not lg.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lg.addHandler(h)
        lg.propagate = False
    lg.setLevel(level.upper())


def _bind(host: str, port: int) -> socket.socket:
    from ..errors import DGemmaError

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise DGemmaError(f"port {port!r} is invalid; expected 0..65535 (0 = any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise DGemmaError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise DGemmaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _print_summary(model: Any, engine: Any, name: str, model_dir: str, max_num_seqs: int, max_queue: int,
                   api_key: str | None, host: str, port: int) -> None:
    from ..cli import human_bytes

    cfg = model.config
    try:
        s = engine.stats()
    except Exception:  # the summary must not stop the server
        s = {}
    per_tok = s.get("kv_bytes_per_token")
    cap = s.get("max_tokens_per_request")
    blocks, block_size = s.get("kv_blocks_total"), s.get("kv_block_size")
    ctx = cfg.text.max_position_embeddings
    if isinstance(per_tok, int) and isinstance(cap, int):
        full = min(ctx, cap)
        kv = f"{human_bytes(per_tok)}/token; a {full:,}-token request needs {human_bytes(per_tok * full)}"
        if isinstance(blocks, int) and isinstance(block_size, int):
            kv += f"; pool {human_bytes(per_tok * blocks * block_size)} ({blocks:,} blocks of {block_size} tokens)"
        elif isinstance(blocks, int):
            kv += f"; pool {blocks:,} blocks"
    else:
        kv = "n/a"
    url_host = f"[{host}]" if ":" in host else host
    lines = [
        f"dgemma server {name}",
        f"  model         {Path(model_dir).resolve()} ({cfg.text.num_hidden_layers} layers, canvas "
        f"{cfg.canvas_length}, context {cfg.text.max_position_embeddings:,})",
        f"  device        {model.device}, {str(model.dtype).removeprefix('torch.')}",
        f"  engine        max_num_seqs {max_num_seqs}, max_queue {max_queue}",
        f"  KV cache      {kv}",
        f"  auth          {'API key required on /v1/*' if api_key else 'none (no API key set)'}",
        f"  listening on  http://{url_host}:{port}/v1   (GET /health, GET /metrics)",
    ]
    print("\n".join(lines), flush=True)


def _draining_server_class() -> type:
    import asyncio
    import logging

    import uvicorn

    log = logging.getLogger("dgemma.server")

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server that drains the app (engine) *before* it stops accepting connections, so that during
        the drain new requests get a 503 instead of a refused connection; a second signal forces the exit."""

        def __init__(self, config: Any, app: Any):
            super().__init__(config)
            self.dgemma_state = app.state.dgemma
            self._loop: asyncio.AbstractEventLoop | None = None
            self._draining = False

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets=sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:  # runs in the signal handler
            # uvicorn re-raises captured signals after serve(); we do not record them, so the exit status is ours.
            if self._draining:
                # Second signal: quit now. The engine thread may be inside a kernel, and interpreter shutdown
                # would cancel every open request with a traceback, so leave without cleanup.
                try:
                    sys.stderr.write("dgemma server: second signal, forced exit\n")
                    sys.stderr.flush()
                    sys.stdout.flush()
                finally:
                    os._exit(1)
            if self._loop is None or not self.started:
                self.should_exit = True  # still starting: stop as soon as uvicorn can
                return
            self._draining = True
            self.dgemma_state.draining = True  # /health → 503 at once
            self._loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            log.info("shutdown requested: draining (send the signal again to force)")
            task = asyncio.ensure_future(self.dgemma_state.drain())

            def done(t: asyncio.Future) -> None:
                if not t.cancelled() and t.exception() is not None:
                    log.error("drain failed: %s", t.exception())
                self.should_exit = True

            task.add_done_callback(done)

    return DrainingServer


def _DrainingServer(config: Any, app: Any) -> Any:
    return _draining_server_class()(config, app)


# ==========================================================================================================
# command line
# ==========================================================================================================
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'8GiB', '512M', '1e9' or '1000000' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if m:
        mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2).lower()]
        return int(float(m.group(1)) * mult)
    try:
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; expected e.g. 8GiB, 512M or a byte count") from None


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `dgemma serve` (used by the CLI and by `python -m dgemma.server`)."""
    p.add_argument("--model", "-m", required=True, metavar="DIR", help="checkpoint directory (HF format)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    p.add_argument("--model-name", "--served-model-name", dest="model_name", metavar="NAME",
                   help="model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("DGEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DGEMMA_API_KEY; none if unset)")
    p.add_argument("--max-num-seqs", type=int, default=16, metavar="N", help="requests generated at once (16)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting beyond those; more get 429 (256)")
    p.add_argument("--kv-cache-bytes", type=parse_bytes, metavar="SIZE",
                   help="KV cache memory, e.g. 8GiB (default: the engine's choice)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: checkpoint's)")
    p.add_argument("--device", metavar="DEV", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds running requests may take to finish (30)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run_serve(args: argparse.Namespace) -> int:
    return serve(args.model, host=args.host, port=args.port, max_num_seqs=args.max_num_seqs,
                 max_queue=args.max_queue, kv_cache_bytes=args.kv_cache_bytes, api_key=args.api_key,
                 model_name=args.model_name, dtype=args.dtype, device=args.device, log_level=args.log_level,
                 drain_timeout=args.drain_timeout)


def main(argv: list[str] | None = None) -> int:
    """`python -m dgemma.server ...`: errors print as `error: <message>` with status 2, like the dgemma CLI."""
    from ..errors import DGemmaError

    p = argparse.ArgumentParser(prog="python -m dgemma.server",
                                description="Serve a DiffusionGemma checkpoint over an OpenAI-compatible HTTP API.")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_serve(args)
    except DGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
