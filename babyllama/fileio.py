"""Files in and out: atomic writes that never clobber what they should not, and read-only mappings.

Every command that writes (export, quantize, data, train) goes through `atomic_write`: the data
goes to a temporary file beside the target, which is renamed into place only when complete, so a
crash, a full disk or Ctrl-C never leaves a half-written output. Before anything is written the
target is checked: its folder must exist, it must not be a folder or a special file (a device,
a FIFO: renaming over /dev/full as root would replace the device node), and it must not be one
of the command's inputs (the same file by any name: a hard link or a symlink counts).
Every operating-system failure becomes an OutputError naming the path, for the CLI's one line.

Readers map files read-only (`map_readonly`) after checking they are regular files, so an
endless stream (/dev/zero, a FIFO) is refused instead of read until memory runs out.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import BabyLlamaError, OutputError


def same_file(a, b) -> bool:
    """Whether two paths name the same file (hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path, inputs: Iterable = (), folder: bool = False) -> Path:
    """Refuse an output path that cannot or must not be written; return it as a Path.

    folder=True: the output is a folder (an HF export), which may exist or be created, but must
    not be a file.
    """
    path = Path(path)
    for src in inputs:
        if src is not None and same_file(path, src):
            raise OutputError(f"{path}: the output is the input {src}; write to another path")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write there: directory {parent} does not exist")
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise OutputError(f"{path}: cannot write there ({e.strerror})") from None
        if folder:
            if not stat.S_ISDIR(mode):
                raise OutputError(f"{path}: expected a directory to write into, found an existing file")
        elif stat.S_ISDIR(mode):
            raise OutputError(f"{path}: is a directory; expected a file path to write")
        elif not stat.S_ISREG(mode):
            raise OutputError(f"{path}: is not a regular file (a device, FIFO or socket); refusing to replace it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write there: directory {parent} is not writable")
    return path


def make_folder(path, inputs: Iterable = ()) -> Path:
    """Create an output folder (not its parents), after check_output(folder=True)."""
    path = check_output(path, inputs, folder=True)
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create directory ({e.strerror})") from None
    return path


def atomic_write(path, write_fn: Callable, inputs: Iterable = ()) -> Path:
    """Call write_fn(binary file) on a temporary file beside `path`, then rename it into place.

    The temporary file is removed on any failure (also when its removal itself fails, the original
    error is the one reported). OS errors become OutputError; other exceptions pass unchanged.
    """
    path = check_output(path, inputs)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, BabyLlamaError):
            raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
        raise
    return path


def write_bytes(path, data: bytes, inputs: Iterable = ()) -> Path:
    """atomic_write of a bytes object."""
    return atomic_write(path, lambda f: f.write(data), inputs)


def regular_file_size(path: Path, error: type, what: str) -> int:
    """Size of `path`, raising `error` unless it is an existing regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is not a regular file (a device, FIFO or socket), expected a {what}")
    return st.st_size


def map_readonly(path, error: type, what: str = "model file") -> np.ndarray:
    """The whole file as a read-only uint8 ndarray over an mmap (no copy).

    A plain ndarray, not np.memmap: Numba's dispatcher types an exact ndarray in C but an
    ndarray subclass in Python, ~0.2 us per weight argument on every forward call.
    """
    path = Path(path)
    size = regular_file_size(path, error, what)
    if size == 0:
        raise error(f"{path}: is empty, expected a {what}")
    try:
        with open(path, "rb") as f:
            return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot map {what} ({e})") from None
