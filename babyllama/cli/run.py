"""`babyllama run`: run.c's flags, defaults and output (the prompt and continuation on stdout,
"achieved tok/s" on stderr), plus --json, top-k / min-p, --threads and --reference."""

from __future__ import annotations

import json
import sys
import time

from ..errors import BabyLlamaError
from ..generation.speculative import SpecStats
from . import OneLineParser, number


def run_parser() -> OneLineParser:
    p = OneLineParser(
        prog="babyllama run",
        description="Generate text with a llama2.c model (run.c's flags and output).",
    )
    p.add_argument("model", nargs="?", help="model: a llama2.c .bin, a Hugging Face folder or a GGUF file (default: the "
                                            "small model bundled with babyllama)")
    p.add_argument("-z", dest="tokenizer", help="tokenizer.bin, tokenizer.json or .model (default: the HF folder's or "
                                                "GGUF file's own; for a .bin beside it, then ./tokenizer.bin)")
    p.add_argument("--quantize", type=int, choices=[8, 4], default=None,
                   help="quantize a float model at load: 8 = int8, 4 = int4 (GGUF Q8_0 / Q4_0 are repacked, not requantized)")
    p.add_argument("-t", dest="temperature", type=number(float, "-t (temperature)", 0.0), default=1.0,
                   help="temperature in [0, inf); 0 = greedy (default 1.0)")
    p.add_argument("-p", dest="topp", type=number(float, "-p (top-p)", 0.0, 1.0), default=0.9,
                   help="top-p (nucleus) sampling in [0, 1]; 0 or 1 = off (default 0.9)")
    p.add_argument("-s", dest="seed", type=number(int, "-s (seed)", 0, 2**64 - 1), default=0,
                   help="random seed (default 0 = time-based, like run.c)")
    p.add_argument("-n", dest="steps", type=number(int, "-n (steps)", 0), default=256,
                   help="positions to run, prompt included; 0 = the model's context (default 256)")
    p.add_argument("-i", dest="prompt", default=None, help="input prompt")
    p.add_argument("-m", dest="mode", choices=["generate", "chat"], default="generate", help="generate|chat")
    p.add_argument("-y", dest="system", default=None, help="system prompt in chat mode")
    p.add_argument("-k", dest="topk", type=number(int, "-k (top-k)", 0), default=0, help="top-k (default 0 = off)")
    p.add_argument("--min-p", dest="minp", type=number(float, "--min-p", 0.0, 1.0), default=0.0,
                   help="min-p in [0, 1) (default 0 = off)")
    p.add_argument("--threads", type=number(int, "--threads", 1), default=None,
                   help="worker threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and timings")
    p.add_argument("--prompts", metavar="FILE",
                   help="many prompts at once, one per line: one JSON line per prompt, in order (prompt i uses seed -s + i)")
    p.add_argument("--max-sequences", type=number(int, "--max-sequences", 1, 4096), default=32,
                   help="with --prompts: sequences decoded together (default 32; the rest wait their turn)")
    p.add_argument("--draft", metavar="MODEL",
                   help="speculative decoding with this smaller model (same tokenizer): the same tokens, fewer passes")
    p.add_argument("--lookup", type=number(int, "--lookup", 1), default=0, metavar="N",
                   help="speculative decoding from the context itself: guess what followed its last n-gram "
                        "(up to N tokens) before")
    p.add_argument("--reference", action="store_true",
                   help="run babyllama/reference.py, the plain-NumPy teaching forward (slow; float64-close, "
                        "not llama2.c's bits)")
    return p


def set_threads(n: int | None) -> None:
    if n is None:
        return
    import numba

    if n > numba.config.NUMBA_NUM_THREADS:
        raise BabyLlamaError(f"--threads must be at most {numba.config.NUMBA_NUM_THREADS} (the cores numba sees), got {n}")
    numba.set_num_threads(n)


def _check_utf8(flag: str, text: str | None) -> None:
    """Text that is not valid UTF-8 (a latin-1 terminal, `$(cat file)`) reaches Python as lone
    surrogates; the tokenizer encodes its original bytes, as run.c does, and we say so."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        print(f"babyllama run: note: {flag} is not valid UTF-8; its bytes are encoded as they are (as run.c does)",
              file=sys.stderr)


def main(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    if args.system is not None and args.mode != "chat":
        raise BabyLlamaError("-y (system prompt) applies to -m chat only; add -m chat or drop -y")
    if args.prompts is not None and (args.prompt is not None or args.mode == "chat" or args.draft or args.lookup):
        raise BabyLlamaError("--prompts runs its file's prompts; it does not combine with -i, -m chat, --draft or --lookup")
    if args.draft and args.lookup:
        raise BabyLlamaError("--draft and --lookup are two ways to draft: choose one")
    _check_utf8("-i", args.prompt)
    _check_utf8("-y", args.system)
    t_start = time.perf_counter()
    set_threads(args.threads)
    from ..api import Model  # numba and the engine load only now

    model = Model.load(args.model, args.tokenizer, quantize=args.quantize)
    if args.reference:
        from ..reference import ReferenceEngine

        model.engine = ReferenceEngine(model.engine.config, model.engine.weights)
    elif model.engine.compiles_on_first_call:  # otherwise the first run looks hung
        print("babyllama: compiling the engine for this machine (first run only, ~20-30 s)", file=sys.stderr)
    if args.mode == "chat":
        return _chat(model, args)
    if args.prompts is not None:
        return _batch(model, args)
    return _generate(model, args, t_start)


def _generate(model, args, t_start: float) -> int:
    from ..generation import resolve_steps

    prompt = model.encode(args.prompt or "")
    if len(prompt) > model.config.seq_len:
        raise BabyLlamaError(f"the prompt is {len(prompt)} tokens, longer than the model's context of "
                             f"{model.config.seq_len}")
    steps = resolve_steps(args.steps, model.config.seq_len)
    used = min(len(prompt), steps + 1)  # run.c forces prompt tokens only while positions last
    if used < len(prompt):
        print(f"babyllama run: note: the prompt is {len(prompt)} tokens but -n {args.steps} runs {steps} positions: "
              f"only its first {used} tokens are used (as run.c does)", file=sys.stderr)
    draft = _draft_model(model, args) if args.draft else None
    stats = SpecStats() if draft is not None or args.lookup else None
    t_first = None
    tokens, text = [], []
    n_sampled = 0
    interrupted = False
    out = sys.stdout
    try:
        for piece in model.pieces(prompt, steps, args.temperature, args.topp, args.seed or None, args.topk,
                                  args.minp, draft=draft, lookup=args.lookup, stats=stats):
            if piece.id >= 0:
                tokens.append(piece.id)
            if not piece.forced and piece.id >= 0:
                n_sampled += 1
                if t_first is None:
                    t_first = time.perf_counter()
            if piece.text:
                text.append(piece.text)
                if not args.json:
                    out.write(piece.text)
                    out.flush()
    except KeyboardInterrupt:
        if not args.json:
            out.write("\n")
            raise
        interrupted = True
    t_end = time.perf_counter()
    tok_s = (n_sampled - 1) / (t_end - t_first) if n_sampled > 1 and t_end > t_first else 0.0
    if args.json:
        result = {
            "tokens": prompt[:1] + tokens,
            "text": "".join(text),
            "prompt_tokens": used,
            "generated_tokens": n_sampled,
            "tokens_per_second": round(tok_s, 3),
            "time_to_first_token_s": round(t_first - t_start, 6) if t_first else None,
        }
        if used < len(prompt):
            result["prompt_tokens_dropped"] = len(prompt) - used
        if stats is not None:
            result.update(drafted_tokens=stats.drafted, accepted_tokens=stats.accepted,
                          acceptance=round(stats.acceptance, 4), rounds=stats.rounds)
        if interrupted:
            result["interrupted"] = True
        print(json.dumps(result), flush=True)
        return 130 if interrupted else 0
    out.write("\n")
    out.flush()
    if n_sampled > 1:
        print(f"achieved tok/s: {tok_s:f}", file=sys.stderr)
    if stats is not None and stats.drafted:
        print(f"speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted ({stats.acceptance:.0%}) "
              f"in {stats.rounds} passes", file=sys.stderr)
    return 0


def _draft_model(model, args):
    """The --draft model over the target's tokenizer; a tokenizer.bin beside the draft must be the same."""
    from pathlib import Path

    from ..api import Model
    from ..engine import Engine
    from ..errors import GenerationError
    from ..formats.llama2c import load_checkpoint
    from ..tokenizers import load_tokenizer

    ck = load_checkpoint(args.draft)
    if ck.config.vocab_size != model.config.vocab_size:
        raise GenerationError(f"the draft model {args.draft} has a vocabulary of {ck.config.vocab_size} tokens, the target "
                              f"{model.config.vocab_size}: a draft must share the target's tokenizer")
    tokenizer = model.tokenizer
    own = Path(args.draft).resolve().parent / "tokenizer.bin"
    if own.is_file() and own.resolve() != Path(model.tokenizer.path).resolve():
        try:
            tokenizer = load_tokenizer(own, ck.config.vocab_size)
        except BabyLlamaError:
            pass  # not this model's tokenizer at all: use the target's
    draft = Model(Engine.from_checkpoint(ck), tokenizer, Path(args.draft))
    model.drafter(draft)  # refuses a draft whose tokenizer differs, before anything runs
    return draft


def _read_prompts(path: str) -> list[str]:
    from ..fileio import regular_file_size

    regular_file_size(path, BabyLlamaError, "prompts file")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.decode("utf-8", "surrogateescape").splitlines()  # the bytes are encoded as they are
    if not lines:
        raise BabyLlamaError(f"{path}: no prompts (expected one prompt per line)")
    return lines


def _batch(model, args) -> int:
    """--prompts: every prompt through the continuous-batching scheduler; JSON lines in input order
    as soon as each prompt and the ones before it are done."""
    from ..generation import Sampling, Scheduler, resolve_steps, text_of

    prompts = _read_prompts(args.prompts)
    cfg = model.config
    steps = resolve_steps(args.steps, cfg.seq_len)
    base = args.seed or int(time.time())
    sched = Scheduler(model.engine, max_sequences=args.max_sequences)
    seqs = []
    for i, text in enumerate(prompts):
        ids = model.encode(text)
        if len(ids) > cfg.seq_len:
            raise BabyLlamaError(f"{args.prompts}, line {i + 1}: the prompt is {len(ids)} tokens, longer than the "
                                 f"model's context of {cfg.seq_len}")
        seed = (base + i) % 2**64 or 1
        sampling = Sampling(args.temperature, args.topp, seed, args.topk, args.minp)
        seqs.append((sched.add(ids, steps, sampling, model.tokenizer.stop_ids), seed))
    t0, printed, generated = time.perf_counter(), 0, 0
    while printed < len(seqs):
        if sched.busy:
            generated += len(sched.step())
        while printed < len(seqs) and seqs[printed][0].done:
            seq, seed = seqs[printed]
            print(json.dumps({
                "index": printed,
                "tokens": seq.all_tokens,
                "text": text_of(model.tokenizer, seq.all_tokens, seq.finish_reason == "stop"),
                "prompt_tokens": len(seq.prompt[: seq.steps + 1]),
                "generated_tokens": len(seq.tokens),
                "finish_reason": seq.finish_reason,
                "seed": seed,
            }), flush=True)
            printed += 1
    elapsed = time.perf_counter() - t0
    print(f"achieved tok/s: {generated / elapsed if elapsed > 0 else 0.0:f} (all {len(seqs)} sequences together)",
          file=sys.stderr)
    return 0


def _read(prompt: str) -> str | None:
    """A line from stdin after printing `prompt`; None at end of input."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\n")


def _chat(model, args) -> int:
    system = args.system
    if system is None and args.prompt is None and sys.stdin.isatty():
        system = _read("Enter system prompt (optional): ") or None
    chat = model.chat(system=system, steps=args.steps, temperature=args.temperature, topp=args.topp,
                      seed=args.seed or None)
    user = args.prompt
    while not chat.full:
        if user is None:
            user = _read("User: ")
            if user is None:  # end of input
                break
        sys.stdout.write("Assistant: ")
        for text in chat.turn(user):
            sys.stdout.write(text)
            sys.stdout.flush()
        if chat.finish_reason == "stop":  # run.c ends a reply with a newline only at EOS
            sys.stdout.write("\n")
        user = None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
