"""The serve benchmark: N concurrent streaming clients x M requests against `babyllama serve` on
random-weight models of llama2.c's shapes, next to the offline generate_batch rate for the same
work and, optionally, llama-cpp-python's server on the same weights (written as GGUF), in one run.

    python -m babyllama.serve.bench --shape 15M --shape 110M --clients 32 --requests 2
    python -m babyllama.serve.bench --peer-python /path/to/venv/bin/python   # + llama-cpp-python

Every request has the same prompt length and max_tokens; request i is seeded base + i, exactly as
generate_batch seeds prompt i, so the offline run and our server generate the same tokens. The
peer (llama-cpp-python serves one request at a time) gets the same requests with the same sampling
settings; its token counts are its own. Reported per server: requests/s, generated tok/s, p50/p99
of time to first token and of inter-token latency, the machine's load average after the run; for
ours, its rate over the offline one (with --repeats, the best of the runs in turns, and each run's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ..testing import SHAPES, placeholder_tokenizer, random_model
from .client import ServerProcess, babyllama_serve, free_port, run_clients, summary

SEED = 1000


def requests_for(clients: int, per_client: int, max_tokens: int) -> list[list[dict]]:
    """Client c's r-th request is request i = c * per_client + r, seeded SEED + i."""
    return [[{"prompt": f"Once upon a time {c:02d}-{r:02d}", "max_tokens": max_tokens, "temperature": 1.0,
              "top_p": 0.9, "seed": SEED + c * per_client + r, "stream_options": {"include_usage": True}}
             for r in range(per_client)] for c in range(clients)]


def offline(model_path: Path, requests: list[list[dict]], clients: int) -> dict:
    """generate_batch over the same prompts and seeds, `clients` sequences at a time."""
    from ..api import Model

    model = Model.load(model_path)
    flat = [b for bs in requests for b in bs]
    ids = [model.encode(b["prompt"]) for b in flat]
    steps = len(ids[0]) - 1 + flat[0]["max_tokens"]
    model.generate_batch(ids[:2], steps=len(ids[0]) + 1, seed=1)  # compile / load the code first
    t0 = time.perf_counter()
    results = model.generate_batch(ids, steps=steps, temperature=1.0, topp=0.9, seed=SEED, max_sequences=clients)
    wall = time.perf_counter() - t0
    tokens = sum(r.generated_tokens for r in results)
    return {"requests": len(flat), "wall_s": round(wall, 3), "requests_s": round(len(flat) / wall, 3),
            "tokens": tokens, "tok_s": round(tokens / wall, 1), "load_avg": load_average()}


def write_gguf(model_path: Path, out: Path) -> Path:
    """The model and its tokenizer as a GGUF llama model (F32), by babyllama's own GGUF export."""
    from ..api import Model
    from ..formats.gguf import export_gguf
    from ..formats.llama2c import load_checkpoint
    from ..tokenizers.gguf import gguf_vocab

    ck = load_checkpoint(model_path)
    return export_gguf(out, ck.config, ck.weights, gguf_vocab(Model.load(model_path).tokenizer))


def measure(server: ServerProcess, requests, warm: dict) -> dict:
    with server:
        run_clients(server.url, [[warm]])  # the first request of a fresh process pays for loading
        results, wall = run_clients(server.url, requests)
    return {**summary(results, wall), "load_avg": load_average()}


def load_average() -> float:
    """The machine's 1-minute load average after a measurement: how much else was running."""
    import os

    return round(os.getloadavg()[0], 2)


def bench_shape(shape: str, args, tmp: Path) -> list[dict]:
    cfg = SHAPES[shape]
    folder = tmp / shape
    folder.mkdir()
    print(f"[{shape}] writing a random model...", file=sys.stderr, flush=True)
    model_path = random_model(cfg, folder / f"{shape}.bin")
    placeholder_tokenizer(cfg.vocab_size).save(folder / "tokenizer.bin")
    requests = requests_for(args.clients, args.requests, args.max_tokens)
    warm = {"prompt": "warm up", "max_tokens": 4, "seed": 1}
    label = f"{shape}, {args.clients} clients x {args.requests}, {args.max_tokens} tokens"
    serve = babyllama_serve(str(model_path), "--port", "0", "--max-sequences", str(args.clients),
                            "--max-queue", str(args.clients * args.requests))
    runs = []
    for i in range(args.repeats):  # in turns, so both see the same machine; the best run is the least disturbed
        print(f"[{shape}] offline generate_batch, then babyllama serve ({i + 1}/{args.repeats})...", file=sys.stderr,
              flush=True)
        runs.append((offline(model_path, requests, args.clients), measure(ServerProcess(serve), requests, warm)))
    base = max((r[0] for r in runs), key=lambda r: r["tok_s"])
    ours = max((r[1] for r in runs), key=lambda r: r["tok_s"])
    ours["vs_offline"] = round(ours["tok_s"] / base["tok_s"], 3)
    if args.repeats > 1:
        ours["vs_offline_each_run"] = " ".join(f"{b['tok_s'] and s['tok_s'] / b['tok_s']:.2f}" for b, s in runs)
    rows = [{"model": label, "server": "offline generate_batch", **base},
            {"model": label, "server": "babyllama serve", **ours}]
    ours = rows[-1]
    if args.peer_python:
        print(f"[{shape}] writing GGUF, llama-cpp-python's server...", file=sys.stderr, flush=True)
        gguf_path = write_gguf(model_path, folder / f"{shape}.gguf")
        port = free_port()
        cmd = [args.peer_python, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(cfg.seq_len), "--n_threads", str(args.threads),
               "--n_threads_batch", str(args.threads), "--interrupt_requests", "False", "--verbose", "False",
               "--model_alias", shape]
        with open(folder / "peer.log", "w") as log:
            peer = measure(ServerProcess(cmd, url=f"http://127.0.0.1:{port}", ready_path="/v1/models", log=log),
                           requests, warm)
        rows.append({"model": label, "server": "llama-cpp-python server", **peer})
        ours["vs_peer_tok_s"] = round(ours["tok_s"] / peer["tok_s"], 2) if peer["tok_s"] else None
    return rows


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(prog="python -m babyllama.serve.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", choices=list(SHAPES), help="model shape (repeatable; default 15M 110M)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends in turn (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates (default 64)")
    p.add_argument("--repeats", type=int, default=1,
                   help="offline and server runs, in turns; the best of each is reported (default 1)")
    p.add_argument("--peer-python", help="a Python with llama-cpp-python[server] and gguf: also run its server")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="the peer's threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for shape in args.shape or ["15M", "110M"] for row in bench_shape(shape, args, Path(tmp))]
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    else:
        from ..cli.bench import print_table

        print_table(rows)
    return 0

if __name__ == "__main__":
    sys.exit(main())
