"""`babyllama bench`: decode speed, time to first token, memory, and (optionally) quality.

    babyllama bench stories15M.bin                 # a real model
    babyllama bench --shape 110M                   # random weights of a llama2.c model's shape
    babyllama bench model.bin --ppl story.txt      # + perplexity on a text
    babyllama bench --shape 110M --quantize 8,4    # fp32 next to int8 and int4 copies, one run
    babyllama bench --shape 110M --peer ./run      # next to llama2.c's own `run` binary

Decode speed is single-stream greedy decoding from BOS, best of --repeats runs (a shared machine
is noisy: the best run is the one least disturbed). GB/s is weights streamed per second: every
decode step reads every weight once, so this is the number to compare with memory bandwidth.
Time to first token is measured in a fresh process, from its start to the first sampled token:
"cold" with an empty compile cache (the first-ever run), "warm" with the cache it left.
--peer times a llama2.c `run` binary (which the project does not ship: build it from llama2.c's
run.c) on each v0 model, greedy from BOS with the same steps and threads, its runs interleaved
with ours so both see the same machine; it reports run.c's own "achieved tok/s".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..errors import BabyLlamaError
from ..evaluate import (
    batch_speed,
    decode_speed,
    first_token_probe,
    peak_rss,
    peer_speed,
    perplexity,
    prefill_speed,
    sgemm_ceiling,
    speculative_speed,
)
from ..testing import SHAPES, placeholder_tokenizer, random_model
from . import OneLineParser

def bench_one(model_path: Path, label: str, args) -> dict:
    from ..engine import Engine
    from ..formats.llama2c import load_checkpoint

    from ..formats import load_for_inference

    ck = load_for_inference(model_path, own_tokenizer=False)  # a .bin, a Hugging Face folder or a GGUF file
    engine = Engine(ck.config, ck.weights, parallel=args.parallel)
    if engine.compiles_on_first_call:  # otherwise the first measurement looks hung
        print("compiling the engine for this machine (first run only, ~20-30 s)...", file=sys.stderr)
    steps = min(args.steps, ck.config.seq_len)
    peers = args.peer if ck.description == "v0" else []  # run.c reads only the v0 format
    if peers:  # one run of ours, then one of each peer, and again: the same machine state for all
        from numba import get_num_threads

        from ..api import find_tokenizer

        tokenizer = find_tokenizer(model_path, args.tokenizer)
        threads = get_num_threads() if engine.parallel else 1
        ours, theirs = [], {p: [] for p in peers}
        for _ in range(args.repeats):
            ours.append(decode_speed(engine, steps, 1)[0])
            for p in peers:
                theirs[p].append(peer_speed(p, model_path, tokenizer, steps, threads))
        best, mean = max(ours), sum(ours) / len(ours)
    elif args.decode:
        best, mean = decode_speed(engine, steps, args.repeats)
    else:
        best = mean = None
    row = {
        "model": label,
        "format": ck.description,
        "file_mb": round(sum(f.stat().st_size for f in (model_path.iterdir() if model_path.is_dir() else [model_path]))
                         / 1e6, 2),
        "params_m": round(ck.config.n_params / 1e6, 2),
        "threads": "n" if engine.parallel else "1",
    }
    if best is not None:
        row.update(steps=steps, tok_s=round(best, 1), tok_s_mean=round(mean, 1),
                   gb_s=round(best * engine.weight_bytes / 1e9, 1))
    for p in peers:
        name = Path(p).name
        row[f"{name}_tok_s"] = round(max(theirs[p]), 1)
        row[f"vs_{name}"] = round(best / max(theirs[p]), 2)  # ours / theirs
    if args.ttft:
        with tempfile.TemporaryDirectory() as cache:
            cold, _ = first_token_probe(model_path, 2, cache)
            warm, rss = first_token_probe(model_path, steps, cache)
        row.update(ttft_cold_s=round(cold, 3), ttft_warm_s=round(warm, 3), peak_rss_mb=round(rss / 1e6, 1))
    if args.prefill:
        tok_s, gflops = prefill_speed(engine, args.prefill, args.repeats)
        row.update(prefill=min(args.prefill, ck.config.seq_len), prefill_tok_s=round(tok_s, 1),
                   prefill_gflop_s=round(gflops, 1), sgemm_gflop_s=round(sgemm_ceiling(ck.config, args.prefill), 1))
    for b in args.batch:
        r = batch_speed(engine, b, args.batch_tokens, args.repeats)
        row.update({f"batch{b}_tok_s": round(r["tok_s"], 1), f"batch{b}_per_seq": round(r["per_seq_tok_s"], 1),
                    f"batch{b}_kv_mb": round(r["kv_mb"], 1)})
    if args.batch:
        row["rss_mb"] = round(peak_rss() / 1e6, 1)
    if args.draft or args.lookup:
        from ..generation.speculative import LookupDraft, ModelDraft

        if args.draft:
            draft_engine = Engine.from_checkpoint(load_checkpoint(args.draft))
            factory = lambda: ModelDraft(draft_engine, ck.config)  # noqa: E731
        else:
            factory = lambda: LookupDraft(args.lookup)  # noqa: E731
        tok_s, acc = speculative_speed(engine, factory, steps, args.repeats)
        row.update(spec_tok_s=round(tok_s, 1), acceptance=round(acc, 3))
        if best:
            row["spec_speedup"] = round(tok_s / best, 2)
    if args.ppl:
        from ..api import Model, find_tokenizer
        from ..tokenizers import load_tokenizer

        own = args.tokenizer or model_path  # an HF folder's or GGUF file's own tokenizer
        if ck.kind == "llmc" and not args.tokenizer:
            from ..formats import llmc_tokenizer_beside

            tok = llmc_tokenizer_beside(model_path, ck.config.vocab_size)
        else:
            tok = load_tokenizer(find_tokenizer(model_path, args.tokenizer) if ck.kind == "bin" else own,
                                 ck.config.vocab_size)
        if ck.config.arch == "gpt2":
            from ..tokenizers.gpt2 import gpt2_conventions

            tok = gpt2_conventions(tok)
        ppl, n = perplexity(Model(engine, tok, model_path), Path(args.ppl).read_text(encoding="utf-8"), args.ppl_tokens)
        row.update(ppl=round(ppl, 4), ppl_tokens=n)
    return row


def _with_quantized(jobs: list, bits_list: str, tmp: Path) -> list:
    """Each fp32 job followed by its quantized copies (`babyllama quantize` with default group size)."""
    from ..convert import quantize_file
    from ..formats import detect_format
    from ..formats.llama2c import load_checkpoint

    try:
        bits = [int(b) for b in bits_list.split(",")]
    except ValueError:
        raise BabyLlamaError(f"--quantize expects bit widths like 8,4, got {bits_list!r}") from None
    if any(b not in (8, 4) for b in bits):
        raise BabyLlamaError(f"--quantize bit widths must be 8 or 4, got {bits_list!r}")
    out = []
    for path, label in jobs:
        out.append((path, label))
        if detect_format(path) == "bin" and load_checkpoint(path).version not in (0, 1):
            continue
        for b in bits:
            print(f"quantizing {label} to int{b}...", file=sys.stderr)
            q = tmp / f"{Path(path).stem}_q{b}.bin"
            quantize_file(path, q, b)
            out.append((q, f"{label} int{b}"))
    return out


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,32, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def print_table(rows: list[dict]) -> None:
    cols = [c for c in rows[0]]
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="babyllama bench", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="model .bin files (any supported format)")
    p.add_argument("--shape", action="append", choices=list(SHAPES), default=[],
                   help="also time a random-weight model of this llama2.c shape (repeatable)")
    p.add_argument("-z", dest="tokenizer", help="tokenizer for --ppl and --peer (default: beside the model)")
    p.add_argument("--steps", type=int, default=256, help="positions to decode per run (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="runs per model; the best is reported (default 3)")
    p.add_argument("--no-ttft", dest="ttft", action="store_false", help="skip the fresh-process first-token runs")
    p.add_argument("--ppl", metavar="TEXT", help="also report perplexity on this UTF-8 text file")
    p.add_argument("--ppl-tokens", type=int, default=20000, help="tokens of the text to score (default 20000)")
    p.add_argument("--serial", dest="parallel", action="store_const", const=False, default=None,
                   help="force one thread")
    p.add_argument("--parallel", dest="parallel", action="store_const", const=True, help="force the thread pool")
    p.add_argument("--quantize", metavar="BITS", default="",
                   help="also time int8/int4 copies of each fp32 model, e.g. 8,4 (written to a temp dir)")
    p.add_argument("--peer", metavar="RUN", action="append", default=[],
                   help="also time this llama2.c `run` binary on each v0 model, interleaved with ours (repeatable)")
    p.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="also time an N-token prompt in one call: tok/s, GFLOP/s, and numpy sgemm's on the same shapes")
    p.add_argument("--batch", type=_int_list, default=[], metavar="B,..",
                   help="also time B sequences decoding together (e.g. 1,8,32): aggregate and per-sequence tok/s")
    p.add_argument("--batch-tokens", type=int, default=128, help="new tokens per sequence for --batch (default 128)")
    p.add_argument("--draft", type=Path, help="also time speculative decoding with this draft model")
    p.add_argument("--lookup", type=int, default=0, metavar="N", help="also time prompt-lookup speculative decoding")
    p.add_argument("--no-decode", dest="decode", action="store_false", help="skip the single-stream decode timing")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args(argv)
    if not args.models and not args.shape:
        p.error("give a model file or --shape")
    if args.steps < 2 or args.repeats < 1 or args.ppl_tokens < 1:
        p.error("--steps must be >= 2, --repeats and --ppl-tokens >= 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(m, m.name) for m in args.models]
        for shape in args.shape:
            print(f"writing a random {shape} model...", file=sys.stderr)
            folder = Path(tmp) / shape
            folder.mkdir()
            if args.peer:  # run.c needs a tokenizer.bin of the model's vocabulary size beside it
                placeholder_tokenizer(SHAPES[shape].vocab_size).save(folder / "tokenizer.bin")
            jobs.append((random_model(SHAPES[shape], folder / f"{shape}.bin"), f"random {shape}"))
        if args.quantize:
            if args.ppl and args.tokenizer is None and args.models:  # the copies live in tmp: keep the original's
                from ..api import find_tokenizer

                args.tokenizer = str(find_tokenizer(args.models[0]))
            jobs = _with_quantized(jobs, args.quantize, Path(tmp))
        for path, label in jobs:
            print(f"benchmarking {label}...", file=sys.stderr)
            row = bench_one(path, label, args)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print_table(rows)
    return 0

