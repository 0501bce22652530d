"""Keep babyllama's on-disk machine code consistent with the sources it was built from.

Numba checks a cached function against its own source file only. But the machine code cached for
the forward also contains every kernel it calls: after an upgrade, or an edit, that changes a
kernel and leaves the forward's file alone, Numba would load a forward built from the old kernels
(wrong numbers, or a crash when a buffer changed shape). So one digest covers every source that
compiled code comes from; when it differs from the one stored beside the cache, all of
babyllama's cache entries are dropped, once, and the next call recompiles.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
STAMP = "babyllama-sources.sha256"
# every module whose code is compiled into a cached entry point
COMPILED_SOURCES = ("simd/*.py", "engine/*.py", "sampling.py")
_checked = False


def sources_digest() -> str:
    """sha256 over every source the cached functions' machine code is compiled from."""
    files = sorted(p for pattern in COMPILED_SOURCES for p in _PACKAGE.glob(pattern))
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def compiled_modules() -> list:
    from .. import sampling
    from ..engine import gpt2, kernels, llama, qgemm, qkernels, qrows
    from . import ofast

    return [ofast, kernels, qkernels, qrows, qgemm, llama, gpt2, sampling]


def cached_functions() -> list:
    """babyllama's Numba functions that keep machine code on disk."""
    from numba.core.dispatcher import Dispatcher

    found = []
    for module in compiled_modules():
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and hasattr(obj._cache, "_cache_file") and obj not in found:
                found.append(obj)
    return found


def _drop(folder: Path, stems: set[str]) -> None:
    """Delete the cache files (index and data) of every function from these modules' files in a
    cache folder, including functions no longer cached, whose files Numba would leave behind."""
    for stem in stems:
        for path in [*folder.glob(f"{stem}.*.nbi"), *folder.glob(f"{stem}.*.nbc")]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def sync(functions, digest: str) -> bool:
    """Drop the cached code of the functions' modules unless every cache folder holds this digest;
    then store it. Returns whether anything was dropped."""
    stems: dict[Path, set[str]] = {}
    for f in functions:  # Numba names a function's cache files after its module's file
        stems.setdefault(Path(f._cache._cache_path), set()).add(Path(f.py_func.__code__.co_filename).stem)
    folders = set(stems)
    if all((d / STAMP).is_file() and (d / STAMP).read_text().strip() == digest for d in folders):
        return False
    for d in folders:
        _drop(d, stems[d])
    for d in folders:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{STAMP}.{os.getpid()}.tmp"
        tmp.write_text(digest + "\n")
        os.replace(tmp, d / STAMP)
    return True


def ensure_fresh() -> None:
    """sync() babyllama's own functions with its sources, once a process, before any of them runs."""
    global _checked
    if _checked:
        return
    _checked = True
    try:
        sync(cached_functions(), sources_digest())
    except (OSError, AttributeError):  # an unwritable cache, or Numba's cache internals moved
        pass


def compiles_on_first_call(dispatcher) -> bool:
    """True when a Numba function has no machine code yet, in memory or in its on-disk cache, so
    its first call compiles (the engine's forward: tens of seconds, once per install)."""
    if dispatcher.overloads:
        return False
    try:
        return not os.path.exists(dispatcher._cache._cache_file._index_path)
    except AttributeError:  # Numba's cache internals moved: say nothing rather than guess
        return False
