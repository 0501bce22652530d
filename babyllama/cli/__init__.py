"""The `babyllama` command: one small module per subcommand, and the one place errors become a line.

Each subcommand module has main(argv) -> exit status and parses its own flags; it is imported
only when used (so `babyllama run` never imports torch). Every user-caused failure raises a
BabyLlamaError, which `main` prints as one line on stderr with a non-zero exit; tracebacks are
for bugs only.
"""

from __future__ import annotations

import argparse
import importlib
import math
import signal
import sys

from ..errors import BabyLlamaError

# subcommand -> one-line help; babyllama.cli.<name> has main(argv) -> int
COMMANDS = {
    "run": "generate text from a model (run.c's flags)",
    "bench": "measure decode speed, time to first token, memory (and quality)",
    "train": "train a model on pretokenized data (needs the train extra)",
    "data": "download corpora, train a vocabulary, pretokenize (needs the train extra)",
    "export": "convert between torch, llama2.c .bin and Hugging Face formats",
    "quantize": "write an int8 (Q8_0) or int4 copy of an fp32 .bin",
    "serve": "serve a model over OpenAI's HTTP API, with a chat page (needs the serve extra)",
}
# the packages each extra brings, for the hint when one is missing
EXTRAS = {"torch": "train", "sentencepiece": "train", "tqdm": "train", "safetensors": "train",
          "uvicorn": "serve", "starlette": "serve", "prometheus_client": "serve"}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind, name, lo=None, hi=None, lo_open=False):
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


def missing_extra(package: str, command: str) -> BabyLlamaError:
    """The error for a subcommand whose extra is not installed, with commands that work both from
    PyPI and from a source checkout."""
    extra = EXTRAS.get(package, "train")
    return BabyLlamaError(
        f"`babyllama {command}` needs the {extra} extra ({package} is not installed): "
        f"pip install 'babyllama[{extra}]' (from a source checkout: pip install -e '.[{extra}]')"
    )


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C: partial output, saved training state


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = OneLineParser(
        prog="babyllama",
        description="llama2.c in Python: run, train, export and quantize baby Llama models.",
        epilog="Run `babyllama COMMAND -h` for a command's flags.",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from .. import __version__

        print(f"babyllama {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        try:
            module = importlib.import_module(f"babyllama.cli.{command}")
        except ModuleNotFoundError as e:
            if e.name in EXTRAS:
                raise missing_extra(e.name, command) from None
            raise
        return int(module.main(rest) or 0)
    except BabyLlamaError as e:
        print(f"babyllama {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"babyllama {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `babyllama run ... | head`
        _silence_stdout()
        return 0
    except OSError as e:  # stdout itself failing: `babyllama run > /dev/full`
        if e.errno is not None and getattr(e, "filename", None) is None:
            _silence_stdout()
            print(f"babyllama {command}: error: cannot write the output ({e.strerror})", file=sys.stderr)
            return 1
        raise


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush of a broken or full stdout cannot
    print a second error."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
