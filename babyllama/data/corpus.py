"""Corpora: reading documents from text/JSONL/JSON files and folders, and downloading archives.

A corpus is a .txt file, a .jsonl file, a .json file holding a list of objects (TinyStories'
own shards), or a folder of those; nothing in the code names a particular dataset except the
download registry, and `--url` reaches any other archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse
from urllib.request import Request, urlopen

from ..errors import DataError
from ..fileio import make_folder

# ---------------------------------------------------------------------------------------------
# progress bars: tqdm when installed, else a plain line on stderr


class _PlainProgress:
    """The few tqdm methods we use, printing one updating line at most twice a second."""

    def __init__(self, total=None, desc="", unit="it", initial=0, **_):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if self._tty and now - self._last > 0.5:
            self._last = now
            of = f" / {self.total}" if self.total else ""
            print(f"\r{self.desc}: {self.n}{of} {self.unit}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self._tty:
            print(file=sys.stderr)


def progress_bar(total=None, desc="", unit="it", initial=0, bytes_=False):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total=total, desc=desc, unit=unit, initial=initial)
    # disable=None: silent when stderr is not a terminal (logs, tests)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=bytes_,
                unit_divisor=1024 if bytes_ else 1000, disable=None)


# ---------------------------------------------------------------------------------------------
# reading corpora

CORPUS_SUFFIXES = (".txt", ".jsonl", ".json")
# How a .txt file is cut into documents:
#   tinystories  a blank line separates paragraphs of one document; a single newline after a
#                non-blank line starts the next document (TinyStories' own text files)
#   line         every non-blank line is a document
#   blank-line   documents are separated by blank lines; single newlines are line wraps
#   none         the whole file is one document
#   auto         tinystories for a single .txt file, none for .txt files inside a folder
SPLIT_MODES = ("auto", "tinystories", "line", "blank-line", "none")
DEFAULT_TEXT_FIELDS = ("text", "story")  # tried in order when --text-field is not given


def iter_documents(path, split_on: str = "auto", text_field: str | None = None) -> Iterator[str]:
    """Yield the documents of a corpus file or folder, stripped, empty ones skipped.

    Folders are read recursively in sorted path order (hidden files skipped), so the document
    order, and everything derived from it, is deterministic. A missing path or an empty folder
    raises at once; problems inside a file raise while iterating.
    """
    if split_on not in SPLIT_MODES:
        raise DataError(f"unknown split mode {split_on!r}: expected one of {', '.join(SPLIT_MODES)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such corpus file or folder")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"{path}: folder holds no corpus files (expected *.txt, *.jsonl or *.json)")
        txt_mode = "none" if split_on == "auto" else split_on
    else:
        files = [path]
        txt_mode = "tinystories" if split_on == "auto" else split_on
    return _documents(files, txt_mode, text_field)


def _documents(files: list[Path], txt_mode: str, text_field: str | None) -> Iterator[str]:
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(f, text_field)
        elif suffix == ".json":
            yield from _json_documents(f, text_field)
        else:
            yield from _text_documents(f, txt_mode)


def _text_documents(path: Path, mode: str) -> Iterator[str]:
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot read corpus file ({e.strerror})") from None
    with f:
        try:
            if mode == "none":
                text = f.read().replace("\r\n", "\n").strip()
                if text:
                    yield text
            else:
                yield from split_lines(f, mode)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: expected UTF-8 text, found an invalid byte at offset {e.start}") from None


def split_lines(lines: Iterable[str], mode: str) -> Iterator[str]:
    """Group lines into documents by `mode` (tinystories, line or blank-line); see SPLIT_MODES."""
    parts: list[str] = []
    blank_before = False
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            blank_before = True
            continue
        if parts:
            new_doc = {
                "line": True,
                "tinystories": not blank_before,
                "blank-line": blank_before,
            }[mode]
            if new_doc:
                yield "".join(parts).strip()
                parts = []
        if parts:
            parts.append("\n\n" if blank_before else "\n")
        parts.append(line)
        blank_before = False
    if parts:
        yield "".join(parts).strip()


def _field(obj, text_field: str | None, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with a text field, found {type(obj).__name__}")
    names = (text_field,) if text_field else DEFAULT_TEXT_FIELDS
    for name in names:
        if name in obj:
            value = obj[name]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, found {type(value).__name__}")
            return value
    wanted = " or ".join(repr(n) for n in names)
    raise DataError(f"{where}: expected field {wanted}, found keys {sorted(obj)[:8]} (choose one with --text-field)")


def _jsonl_documents(path: Path, text_field: str | None) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: expected one JSON object per line, found invalid JSON ({e.msg})") from None
            text = _field(obj, text_field, f"{path}:{lineno}").strip()
            if text:
                yield text


def _json_documents(path: Path, text_field: str | None) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects (like TinyStories' shards), found {type(items).__name__}")
    for i, obj in enumerate(items):
        text = _field(obj, text_field, f"{path}[{i}]").strip()
        if text:
            yield text


# ---------------------------------------------------------------------------------------------
# download


@dataclass(frozen=True)
class Dataset:
    """A downloadable corpus. sha256 is None where no published checksum is known."""

    url: str
    sha256: str | None = None
    description: str = ""


DATASETS = {
    # the archive llama2.c's tinystories.py downloads: 50 JSON shards of {"story": ...} objects
    "tinystories": Dataset(
        url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz",
        description="TinyStories (Eldan & Li 2023), ~2.1M short stories, 50 JSON shards",
    ),
}


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, out_dir, sha256: str | None = None, unpack: bool = True, timeout: float = 60.0) -> Path:
    """Download `url` into `out_dir` and unpack it; return the unpacked folder or the file.

    The bytes go to NAME.part first; a later call resumes it with an HTTP Range request (a
    server that ignores Range makes it start over). The finished file is checked against
    `sha256` when given, then renamed to NAME. .tar(.gz|.bz2|.xz) and .zip archives are
    unpacked into out_dir/STEM (through a temporary folder renamed into place). out_dir may
    exist or be created (one level).
    """
    out_dir = make_folder(out_dir)
    name = Path(unquote(urlparse(url).path)).name or "download"
    dest = out_dir / name
    expected = sha256.lower() if sha256 else None
    if not dest.exists():
        part = dest.with_name(name + ".part")
        _fetch(url, part, timeout)
        if expected:
            found = sha256_file(part)
            if found != expected:
                part.unlink()
                raise DataError(f"{url}: sha256 mismatch: expected {expected}, found {found} (the download was removed)")
        os.replace(part, dest)
    elif expected and (found := sha256_file(dest)) != expected:
        raise DataError(f"{dest}: sha256 mismatch: expected {expected}, found {found} (delete it to download again)")
    if unpack and _archive_stem(name):
        return _unpack(dest, out_dir / _archive_stem(name))
    return dest


def _fetch(url: str, part: Path, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "babyllama"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the partial file is already whole
            return
        raise DataError(f"{url}: download failed: HTTP {e.code} {e.reason}") from None
    except (URLError, OSError) as e:
        raise DataError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
    with resp:
        resumed = have > 0 and resp.status == 206
        if not resumed:
            have = 0  # the server sent the whole file
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        bar = progress_bar(total=total, desc=part.name[: -len(".part")], unit="B", initial=have, bytes_=True)
        got = have
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise DataError(f"{url}: download interrupted after {got} bytes ({e}); run again to resume") from None
        finally:
            bar.close()
    if total is not None and got != total:
        raise DataError(f"{url}: download incomplete: expected {total} bytes, found {got}; run again to resume")


def _archive_stem(name: str) -> str | None:
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _unpack(archive: Path, target: Path) -> Path:
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.unpacking{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)  # zipfile drops absolute paths and ".." itself
        else:
            with tarfile.open(archive, "r:*") as t:
                # the "data" filter refuses absolute paths, ".." and links leaving the folder
                t.extractall(tmp, filter="data")
        os.replace(tmp, target)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{archive}: cannot unpack archive ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
