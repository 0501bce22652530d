"""The client side of an OpenAI-compatible server, for the load test and the serve benchmark:
start a server process and wait until it is ready, and drive it with N concurrent streaming clients
that record when every token arrives.

    with ServerProcess(["babyllama", "serve", "model.bin", "--port", "0"]) as server:
        results, wall = run_clients(server.url, [[body] * 4 for _ in range(32)])
        print(summary(results, wall))

Streams are read with httpx2 (what the openai client is built on) and only json-decoded, so the
clients cost the machine little next to the server they measure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    """One streamed request: its text, token count and every content chunk's arrival time."""

    status: int
    text: str = ""
    tokens: int = 0  # completion tokens: the usage chunk's count if sent, else content chunks
    finish_reason: str | None = None
    sent: float = 0.0
    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.times[0] - self.sent if self.times else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


async def stream(client, url: str, body: dict, headers: dict | None = None) -> Result:
    """POST a streaming completion or chat request and read its server-sent events."""
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = dict(body, stream=True)
    result = Result(0, sent=time.perf_counter())
    chunks = 0
    try:
        async with client.stream("POST", url + path, json=body, headers=headers or {}) as r:
            result.status = r.status_code
            if r.status_code != 200:
                result.error = (await r.aread()).decode("utf-8", "replace")
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"].get("message", str(event["error"]))
                    break
                if event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        result.times.append(time.perf_counter())
                        result.text += text
                        chunks += 1
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except Exception as e:  # a refused or broken connection is a result too, for the caller to count
        result.error = f"{type(e).__name__}: {e}"
    result.tokens = result.tokens or chunks
    return result


def run_clients(url: str, requests: list[list[dict]], headers: dict | None = None,
                timeout: float = 600.0) -> tuple[list[list[Result]], float]:
    """Client i sends requests[i] one after another, all clients at once; returns each client's
    results and the wall time of the whole run."""
    import httpx2

    async def main():
        limits = httpx2.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
        async with httpx2.AsyncClient(timeout=timeout, limits=limits) as client:
            async def one(bodies):
                return [await stream(client, url, b, headers) for b in bodies]

            t0 = time.perf_counter()
            out = await asyncio.wait_for(asyncio.gather(*(one(b) for b in requests)), timeout)
            return out, time.perf_counter() - t0

    return asyncio.run(main())


def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summary(results: list[list[Result]], wall: float) -> dict:
    """requests/s, generated tok/s, and p50/p99 of time to first token and inter-token latency."""
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if r.status == 200 and r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    return {
        "requests": len(flat), "failed": len(flat) - len(ok), "wall_s": round(wall, 3),
        "requests_s": round(len(ok) / wall, 3), "tokens": tokens, "tok_s": round(tokens / wall, 1),
        "ttft_p50_s": _round(percentile(ttft, 50)), "ttft_p99_s": _round(percentile(ttft, 99)),
        "itl_p50_s": _round(percentile(gaps, 50)), "itl_p99_s": _round(percentile(gaps, 99)),
    }


def _round(x):
    return None if x is None else round(x, 4)


# ---------------------------------------------------------------------------- server processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get(url: str, headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """A GET with the standard library: (status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class ServerProcess:
    """A server in a child process: `babyllama serve ... --port 0` (its URL is read from the line it
    prints) or any command given its url. start() waits until `ready_path` answers 200."""

    URL_LINE = re.compile(r"at (http://\S+?)/? ")

    def __init__(self, cmd: list[str], url: str | None = None, ready_path: str = "/health", env: dict | None = None,
                 log=None):
        self.cmd, self.url, self.ready_path = cmd, url, ready_path
        self.env = dict(os.environ, **(env or {}))
        self.log = log  # a file for the child's stderr (default: this process's stderr)
        self.proc: subprocess.Popen | None = None
        self.first_line = ""

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL,
                                     env=self.env, text=True)
        deadline = time.monotonic() + timeout
        if self.url is None:
            self.first_line = self.proc.stdout.readline()
            m = self.URL_LINE.search(self.first_line)
            if not m:
                self.stop()
                raise RuntimeError(f"{self.cmd[:3]} did not print its URL: {self.first_line!r}")
            self.url = m.group(1)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[:3]} exited with status {self.proc.returncode} before it was ready")
            if get(self.url + self.ready_path, timeout=2)[0] == 200:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.cmd[:3]} was not ready after {timeout} s")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int | None:
        """Signal the server (Ctrl-C by default) and wait; kill it if it does not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


def babyllama_serve(*args: str) -> list[str]:
    """The command line of `babyllama serve ARGS` in this Python."""
    return [sys.executable, "-m", "babyllama", "serve", *args]
