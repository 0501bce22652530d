"""The `babyllama` command: run.c's flags for `run`, plus train / data / export / quantize / bench.

Subcommands other than `run` live in their own modules, which parse their own flags and are
imported only when used (so `babyllama run` never imports torch). Every user-caused failure
becomes one line on stderr and a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from .errors import BabyLlamaError

# subcommand -> (module, one-line help); each module has main(argv) -> int
DELEGATED = {
    "bench": ("babyllama.bench", "measure decode speed, time to first token, memory (and quality)"),
    "train": ("babyllama.train", "train a model on pretokenized data (needs the train extra)"),
    "data": ("babyllama.data", "download corpora, train a vocabulary, pretokenize (needs the train extra)"),
    "export": ("babyllama.export", "convert between torch, llama2.c .bin and Hugging Face formats"),
    "quantize": ("babyllama.quantize", "write an int8 (Q8_0) or int4 copy of an fp32 .bin"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, name, lo=None, hi=None, lo_open=False):
    """An argparse type that checks a range and names the flag, the range and the value."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
        if bad_lo or (hi is not None and value > hi):
            lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
            hi_s = "" if hi is None else f"<= {hi}"
            raise argparse.ArgumentTypeError(f"{name} must be {' and '.join(s for s in (lo_s, hi_s) if s)}, got {text}")
        return value

    return parse


def run_parser() -> OneLineParser:
    p = OneLineParser(
        prog="babyllama run",
        description="Generate text with a llama2.c model (run.c's flags and output).",
    )
    p.add_argument("model", nargs="?", help="model .bin (default: the small model bundled with babyllama)")
    p.add_argument("-z", dest="tokenizer", help="tokenizer.bin (default: beside the model, then ./tokenizer.bin)")
    p.add_argument("-t", dest="temperature", type=_number(float, "-t (temperature)", 0.0), default=1.0,
                   help="temperature in [0, inf); 0 = greedy (default 1.0)")
    p.add_argument("-p", dest="topp", type=_number(float, "-p (top-p)", 0.0, 1.0), default=0.9,
                   help="top-p (nucleus) sampling in [0, 1]; 0 or 1 = off (default 0.9)")
    p.add_argument("-s", dest="seed", type=_number(int, "-s (seed)", 0, 2**64 - 1), default=0,
                   help="random seed (default 0 = time-based, like run.c)")
    p.add_argument("-n", dest="steps", type=_number(int, "-n (steps)", 0), default=256,
                   help="positions to run, prompt included; 0 = the model's context (default 256)")
    p.add_argument("-i", dest="prompt", default=None, help="input prompt")
    p.add_argument("-m", dest="mode", choices=["generate", "chat"], default="generate", help="generate|chat")
    p.add_argument("-y", dest="system", default=None, help="system prompt in chat mode")
    p.add_argument("-k", dest="topk", type=_number(int, "-k (top-k)", 0), default=0, help="top-k (default 0 = off)")
    p.add_argument("--min-p", dest="minp", type=_number(float, "--min-p", 0.0, 1.0), default=0.0,
                   help="min-p in [0, 1) (default 0 = off)")
    p.add_argument("--threads", type=_number(int, "--threads", 1), default=None,
                   help="worker threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and timings")
    return p


def set_threads(n: int | None) -> None:
    if n is None:
        return
    import numba

    if n > numba.config.NUMBA_NUM_THREADS:
        raise BabyLlamaError(f"--threads must be at most {numba.config.NUMBA_NUM_THREADS} (the cores numba sees), got {n}")
    numba.set_num_threads(n)


def cmd_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    t_start = time.perf_counter()
    set_threads(args.threads)
    from .generate import Model  # numba and the engine load only now

    model = Model.load(args.model, args.tokenizer)
    if model.engine.compiles_on_first_call:  # otherwise the first run looks hung
        print("babyllama: compiling the engine for this machine (first run only, ~20 s)", file=sys.stderr)
    if args.mode == "chat":
        return _chat(model, args)

    t_first = None
    tokens, text = [], []
    out = sys.stdout
    prompt = model.encode(args.prompt or "")
    n_sampled = 0
    for piece in model.pieces(prompt, args.steps, args.temperature, args.topp, args.seed or None, args.topk, args.minp):
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
    t_end = time.perf_counter()
    tok_s = (n_sampled - 1) / (t_end - t_first) if n_sampled > 1 and t_end > t_first else 0.0
    if args.json:
        print(json.dumps({
            "tokens": prompt[:1] + tokens,
            "text": "".join(text),
            "prompt_tokens": len(prompt),
            "generated_tokens": n_sampled,
            "tokens_per_second": round(tok_s, 3),
            "time_to_first_token_s": round(t_first - t_start, 6) if t_first else None,
        }))
    else:
        out.write("\n")
        out.flush()
        if n_sampled > 1:
            print(f"achieved tok/s: {tok_s:f}", file=sys.stderr)
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
        sys.stdout.write("\n")
        user = None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = OneLineParser(
        prog="babyllama",
        description="llama2.c in Python: run, train, export and quantize baby Llama models.",
        epilog="Run `babyllama COMMAND -h` for a command's flags.",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="generate text from a model (run.c's flags)", add_help=False)
    for name, (_, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"babyllama {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            return cmd_run(rest)
        if command not in DELEGATED:
            top.error(f"unknown command {command!r} (choose from run, {', '.join(DELEGATED)})")
        module = _import_command(command)
        return int(module.main(rest) or 0)
    except BabyLlamaError as e:
        print(f"babyllama {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"babyllama {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `babyllama run ... | head`
        return 0


def _import_command(command: str):
    import importlib

    module_name = DELEGATED[command][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in ("torch", "sentencepiece", "tqdm", "safetensors"):
            raise BabyLlamaError(
                f"`babyllama {command}` needs the train extra ({e.name} is not installed): pip install 'babyllama[train]'"
            ) from None
        raise


if __name__ == "__main__":
    sys.exit(main())
