"""A real `python serve.py` on loopback for the serving tests: a fresh process on a free port."""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .conftest import ROOT

READY = re.compile(r"serving \w+ from .* on (http://[\d.]+:\d+)")


class LiveServer:
    """`with LiveServer("ckpt_path=...", "server.port=0", ...) as server:` then `server.url`: serve.py
    with exactly these arguments, run from `cwd`, stopped on exit."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        self.args = [str(ROOT / "serve.py"), *args]
        self.cwd, self.lines, self.url = cwd, [], ""

    @classmethod
    def on_free_port(cls, ckpt: Path | str, run_dir: Path, *overrides: str) -> "LiveServer":
        return cls(f"ckpt_path={ckpt}", "server.port=0", f"hydra.run.dir={run_dir}", *overrides)

    def __enter__(self) -> "LiveServer":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")  # a shared CI core: no spinning threads
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            cwd=self.cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        found = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if not found.is_set() and (match := READY.search(line)):
                    self.url = match.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"serve.py did not start:\n{self.log()}")
        while httpx.get(f"{self.url}/health", timeout=30).status_code != 200:  # listening before startup ends
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return "".join(self.lines)[-5000:]

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    """A loopback port nothing listens on now (redis-server has no 'pick one for me')."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throwaway `redis-server` on loopback: no persistence, stopped and restarted by the tests."""

    def __init__(self, port: int) -> None:
        self.port, self.url = port, f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        import redis

        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
