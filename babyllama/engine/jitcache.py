"""Keep Numba's on-disk cache of compiled kernels consistent with the sources it was built from.

Numba checks a cached function against its own source file only. But the machine code cached for
`fp32.forward` also contains every kernel it calls: after an upgrade, or an edit, that changes
kernels.py and leaves fp32.py alone, Numba would load a forward built from the old kernels (wrong
numbers, or a crash when a buffer changed shape). So one digest covers every source that compiled
code comes from; when it differs from the one stored beside the cache, all of babyllama's cache
entries are dropped, once, and the next call recompiles.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
STAMP = "babyllama-sources.sha256"
_checked = False


def sources_digest() -> str:
    """sha256 over the engine's modules and the sampler (everything with cache=True functions)."""
    files = sorted((_PACKAGE / "engine").glob("*.py")) + [_PACKAGE / "sampler.py"]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cached_functions() -> list:
    """babyllama's Numba functions that keep machine code on disk."""
    from numba.core.dispatcher import Dispatcher

    from .. import sampler
    from . import fp32, kernels, ofast, q4kernels, qkernels, quant

    found = []
    for module in (fp32, kernels, ofast, q4kernels, qkernels, quant, sampler):
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and hasattr(obj._cache, "_cache_file") and obj not in found:
                found.append(obj)
    return found


def _drop(dispatcher) -> None:
    """Delete a function's cache index and data files (Numba's own flush would leave an empty index
    behind, which would look like a warm cache to compiles_on_first_call)."""
    index = Path(dispatcher._cache._cache_file._index_path)
    for path in [index, *index.parent.glob(index.stem + ".*.nbc")]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def sync(functions, digest: str) -> bool:
    """Drop the functions' cached code unless every cache folder holds this digest; then store it.
    Returns whether anything was dropped."""
    folders = {Path(f._cache._cache_path) for f in functions}
    if all((d / STAMP).is_file() and (d / STAMP).read_text().strip() == digest for d in folders):
        return False
    for f in functions:
        _drop(f)
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
    except (OSError, AttributeError):  # a read-only install, or Numba's cache internals moved
        pass
