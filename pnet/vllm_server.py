"""`vllm serve DIR` as a context manager: start the OpenAI-compatible server on a free local port, wait until it
answers `/health`, stop it afterwards. Used by the serving tests (`tests_vllm/`) and `bench/vllm_serve_greedy.py`.
Standard library only: it drives the `vllm` executable beside the running Python, so it needs vLLM's environment.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def vllm_server(
    model_dir: str | os.PathLike,
    log_path: str | os.PathLike,
    served_model_name: str,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float | None = 600.0,
) -> Iterator[str]:
    """Serve `model_dir` in float32 (its output goes to `log_path`) and yield the base URL `http://127.0.0.1:PORT`
    once `/health` answers. RuntimeError, with the end of the log, if the server exits first or is not healthy
    within `timeout_s` (None: wait as long as it runs)."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(model_dir), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--served-model-name", served_model_name, *extra_args,
    ]  # fmt: skip
    log_path = Path(log_path)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with log_path.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {server.returncode}; end of {log_path}:\n"
                                       f"{log_path.read_text()[-3000:]}")
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not become healthy in {timeout_s:.0f} s; end of {log_path}:\n"
                                       f"{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(2)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
