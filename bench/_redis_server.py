"""Debian's redis-server for the benches whose limits live in Redis: one throwaway
server on a free loopback port, no persistence, stopped with the bench's other processes."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from gateway_overhead import free_port


def start_redis(directory: Path, procs: list[subprocess.Popen[bytes]]) -> str:
    """Start redis-server (working directory `directory`), added to `procs`; its URL once
    it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("needs Debian's redis-server (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
            *("--save", "", "--appendonly", "no", "--loglevel", "warning"),
        ],
        stdout=subprocess.DEVNULL,
    )
    procs.append(proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False
        )
        if out.stdout.strip() == "PONG":
            return f"redis://127.0.0.1:{port}/0"
        if proc.poll() is not None:
            raise SystemExit(f"redis-server exited with {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")
