"""Helpers for the HTTP server tests: run `dgemma serve` as a real subprocess on an ephemeral port.

The server is started with `--port 0`; it binds a free port itself and prints `listening on http://HOST:PORT/v1`,
which `ServerProcess` reads from the server's log file (no port race). Every wait is bounded, and `stop()` always
ends the process (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

LISTEN_RE = re.compile(r"listening on\s+http://([^\s/]+):(\d+)/v1")


def server_command(args: list[str]) -> list[str]:
    """`python -m dgemma serve ARGS` when the CLI has the subcommand, else `python -m dgemma.server ARGS`
    (same flags: both use dgemma.server.add_serve_arguments)."""
    from dgemma.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and "serve" in action.choices:
            return [sys.executable, "-m", "dgemma", "serve", *args]
    return [sys.executable, "-m", "dgemma.server", *args]


class ServerProcess:
    def __init__(self, model_dir: Path, log_path: Path, *extra: str, startup_timeout: float = 60.0):
        self.log_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("DGEMMA_API_KEY", None)
        self._log = open(log_path, "wb")
        cmd = server_command(["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", *extra])
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        try:
            self.port = self._wait_for_port(startup_timeout)
            self.base = f"http://127.0.0.1:{self.port}"
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise

    # ---------------------------------------------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = LISTEN_RE.search(self.log())
            if m:
                return int(m.group(2))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not print its port within {timeout}s:\n{self.log()}")

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not healthy within {timeout}s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """End the server for sure: SIGTERM, then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(15) is None:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ------------------------------------------------------------------------------------------------------------
def sse_events(response: httpx.Response) -> Iterator[Any]:
    """Parse an SSE stream: yields each `data:` payload as JSON, or the string "[DONE]"."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            assert line == "" or line.startswith(":"), f"unexpected SSE line {line!r}"
            continue
        data = line[len("data:"):].strip()
        yield data if data == "[DONE]" else json.loads(data)


def assert_openai_error(r: httpx.Response, status: int, *needles: str, param: str | None = "<any>") -> dict:
    """The response is `status` with exactly OpenAI's error shape; its message contains every needle."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert "Traceback" not in err["message"]
    for n in needles:
        assert n.lower() in err["message"].lower(), (n, err["message"])
    if param != "<any>":
        assert err["param"] == param, err
    return err


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample `name` in Prometheus text, or None."""
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None
