"""One set of Numba options for all of babyllama's compiled code, and where its machine code lives.

JIT: no fastmath, ever: it would let LLVM reorder the very sums that reproduce llama2.c's
-Ofast order (ofast.py). Kernels are compiled with JIT and never cached on their own; only entry
points (`entry`: the forward passes, the RoPE table, the sampler) keep machine code on disk. A
kernel cached alone is loaded as finished machine code when a forward is compiled in a later
process and called opaquely: measured 20-60% slower forwards (no inlining), and with threaded
kernels loaded that way, a cached forward that segfaulted in the next process.

The cache is a per-user folder (cache_dir), never the installed package: a package directory
written at run time outlives a reinstall, and an `pip install -e .` over a `pip install .` then
imports that leftover folder as an empty namespace package (`babyllama.engine` with no Engine).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from numba import config, njit
from numba.core.caching import CompileResultCacheImpl, FunctionCache, UserProvidedCacheLocator

JIT = dict(cache=False, nogil=True, error_model="numpy", fastmath=False)


def cache_dir() -> Path:
    """Where babyllama's compiled code is kept: NUMBA_CACHE_DIR when set (Numba's own switch),
    else $BABYLLAMA_CACHE_DIR, else $XDG_CACHE_HOME/babyllama (~/.cache/babyllama)."""
    if config.CACHE_DIR:
        return Path(config.CACHE_DIR)
    if os.environ.get("BABYLLAMA_CACHE_DIR"):
        return Path(os.environ["BABYLLAMA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "babyllama"


class _UserCacheLocator(UserProvidedCacheLocator):
    """Numba's locator for a user-provided folder, pointed at cache_dir() (per source folder, as
    Numba names them), for babyllama's functions only."""

    root: Path | None = None

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(self.root or cache_dir(), self.get_suitable_cache_subpath(py_file))

    @classmethod
    def from_function(cls, py_func, py_file):
        return super(UserProvidedCacheLocator, cls).from_function(py_func, py_file)  # the mixin's: checks writability


class _TempCacheLocator(_UserCacheLocator):
    """Fallback when the user cache folder cannot be written (a read-only home): a folder in the
    system's temporary directory, so a run still caches rather than compiling every time."""

    root = Path(tempfile.gettempdir()) / f"babyllama-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


class _CacheImpl(CompileResultCacheImpl):
    _locator_classes = [_UserCacheLocator, _TempCacheLocator]


class _Cache(FunctionCache):
    _impl_class = _CacheImpl


def entry(fn=None, **options):
    """njit(**JIT) with machine code kept in cache_dir() (see the module docstring for why only
    entry points are cached). `@entry(**options)` overrides JIT's options (the hand-written
    trainer's kernels, training/grad/ops.py, allow reassociation)."""
    if fn is None:
        return lambda f: entry(f, **options)
    dispatcher = njit(**{**JIT, **options})(fn)
    try:
        dispatcher._cache = _Cache(dispatcher.py_func)
    except RuntimeError:  # no writable folder at all: compile in every process
        pass
    return dispatcher
