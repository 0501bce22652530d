"""Training data: corpora in, token shards out, and the batches the trainer reads.

The pipeline is three `babyllama data` subcommands and one class:
  download      fetch an archive (resumable, sha256-checked) and unpack it
  train-vocab   sentencepiece BPE with llama2.c's settings -> tokN.model + tokN.bin
  pretokenize   corpus -> DIR/train_000.bin ..., DIR/val.bin, DIR/meta.json
  TokenWindows  random (x, y) windows over the shards, the batches train.py reads

A corpus is a .txt file, a .jsonl file, a .json file holding a list of objects (TinyStories'
own shards), or a folder of those; nothing in the code names a particular dataset except the
download registry, and `--url` reaches any other archive.

Shard format: raw little-endian token ids (uint16 when the vocabulary fits, else uint32), every
document preceded by BOS, no header. meta.json describes the directory and is written last,
so a directory without it is incomplete.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import struct
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

import numpy as np

from .checkpoint import atomic_write
from .errors import BabyLlamaError, DataError, TokenizerError

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


def _progress(total=None, desc="", unit="it", initial=0, bytes_=False):
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
    unpacked into out_dir/STEM (through a temporary folder renamed into place).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        bar = _progress(total=total, desc=part.name[: -len(".part")], unit="B", initial=have, bytes_=True)
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


# ---------------------------------------------------------------------------------------------
# vocabulary training (sentencepiece) and tokenizer.bin export

N_SPECIAL = 3  # <unk>, <s>, </s> at ids 0, 1, 2
N_BYTE_PIECES = 256  # byte fallback: one piece per byte value, ids 3..258
MIN_VOCAB = N_SPECIAL + N_BYTE_PIECES + 1  # plus at least one character of the corpus

# llama2.c's train_vocab settings (tinystories.py), so vocabularies are interchangeable with its own.
LLAMA2C_SPM_SETTINGS = dict(
    model_type="bpe",
    character_coverage=1.0,  # every character of the corpus is a piece (rare ones too)
    split_digits=True,  # numbers are spelled digit by digit, like Llama 2
    allow_whitespace_only_pieces=True,
    byte_fallback=True,  # unknown characters become <0xNN> byte pieces instead of <unk>
    unk_surface=" \u2047 ",
    normalization_rule_name="identity",  # no NFKC: the text is the text
    add_dummy_prefix=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


def _import_sentencepiece():
    try:
        import sentencepiece as spm
    except ImportError:
        raise DataError("sentencepiece is not installed: pip install 'babyllama[train]'") from None
    return spm


def train_vocab(vocab_size: int, input, out_dir, split_on: str = "auto", text_field: str | None = None,
                max_documents: int | None = None, num_threads: int | None = None) -> tuple[Path, Path]:
    """Train a BPE vocabulary on a corpus; write out_dir/tok{N}.model and tok{N}.bin atomically.

    Sentences given to sentencepiece are the non-blank lines of each document (as llama2.c's
    tiny.txt has them). Returns (model_path, bin_path).
    """
    spm = _import_sentencepiece()
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab size {vocab_size} is too small: byte fallback needs {N_BYTE_PIECES} byte pieces + "
            f"<unk>, <s>, </s> plus the corpus' characters; expected at least {MIN_VOCAB}"
        )
    counted = [0]

    def sentences():
        for i, doc in enumerate(iter_documents(input, split_on, text_field)):
            if max_documents is not None and i >= max_documents:
                return
            for line in doc.split("\n"):
                if line.strip():
                    counted[0] += 1
                    yield line

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **LLAMA2C_SPM_SETTINGS,
        )
    except RuntimeError as e:
        if counted[0] == 0:
            raise DataError(f"{input}: corpus holds no text to train a vocabulary on") from None
        raise DataError(_explain_spm_error(str(e), vocab_size)) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"tok{vocab_size}.model"
    atomic_write(model_path, lambda f: f.write(model.getvalue()))
    bin_path = export_tokenizer(model_path, out_dir / f"tok{vocab_size}.bin")
    return model_path, bin_path


def _explain_spm_error(msg: str, vocab_size: int) -> str:
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        need = int(m.group(2))
        return (f"vocab size {vocab_size} is too small for this corpus: its {need - N_SPECIAL - N_BYTE_PIECES} "
                f"distinct characters + {N_SPECIAL + N_BYTE_PIECES} byte/special pieces need at least {need}")
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return (f"vocab size {vocab_size} is too large for this corpus: sentencepiece can learn at most "
                f"{m.group(2)} pieces from it; use a smaller --vocab-size or more text")
    return f"sentencepiece training failed: {msg.strip().splitlines()[-1] if msg.strip() else msg}"


def load_sentencepiece(model_path):
    """Open a sentencepiece .model file, raising TokenizerError when it is missing or malformed."""
    spm = _import_sentencepiece()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TokenizerError(f"{model_path}: no such sentencepiece tokenizer (.model) file")
    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{model_path}: not a sentencepiece model ({str(e).strip()[:120]})") from None


def export_tokenizer(model_path, out_bin) -> Path:
    """Write a sentencepiece model as tokenizer.bin (DESIGN.md), atomically; return the path.

    Scores are sentencepiece's; "▁" becomes a space; BOS/EOS are written as "\\n<s>\\n" and
    "\\n</s>\\n" as llama2.c's exporter does, so its tok512.bin is reproduced byte for byte.
    """
    sp = load_sentencepiece(model_path)
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if ids != (0, 1, 2):
        raise TokenizerError(
            f"{model_path}: expected <unk>, <s>, </s> at ids 0, 1, 2 (llama2.c's convention), found {ids}"
        )
    pieces = []
    for i in range(sp.vocab_size()):
        if i == 1:
            text = "\n<s>\n"
        elif i == 2:
            text = "\n</s>\n"
        else:
            text = sp.id_to_piece(i).replace("\u2581", " ")
        pieces.append((sp.get_score(i), text.encode("utf-8")))
    max_len = max(len(b) for _, b in pieces)

    def write(f):
        f.write(struct.pack("<i", max_len))
        for score, b in pieces:
            f.write(struct.pack("<fi", score, len(b)))
            f.write(b)

    out_bin = Path(out_bin)
    atomic_write(out_bin, write)
    return out_bin


# ---------------------------------------------------------------------------------------------
# pretokenize: corpus -> token shards

META_FORMAT = "babyllama-tokens"
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
_BATCH_DOCS = 256  # documents per unit of work sent to a worker process


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The little-endian integer type token ids are stored in."""
    if requested == "auto":
        requested = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested == "uint16":
        if vocab_size > 1 << 16:
            raise DataError(f"a vocabulary of {vocab_size} tokens does not fit uint16 (at most 65536 ids); "
                            "use --dtype uint32 or auto")
        return np.dtype("<u2")
    if requested == "uint32":
        return np.dtype("<u4")
    raise DataError(f"unknown token dtype {requested!r}: expected auto, uint16 or uint32")


def is_val_document(index: int, val_fraction: float) -> bool:
    """Whether document `index` belongs to the validation split.

    Every 1/val_fraction-th document, starting with the first: deterministic, independent of
    the worker count, needs no document count in advance, and gives a non-empty split whenever
    val_fraction > 0.
    """
    return math.ceil((index + 1) * val_fraction) > math.ceil(index * val_fraction)


_worker_sp = None


def _init_worker(model_path: str) -> None:
    global _worker_sp
    _worker_sp = load_sentencepiece(model_path)


def _encode_batch(texts: list[str]) -> list[list[int]]:
    # one thread per process: the process pool is the parallelism
    return _worker_sp.encode(texts, num_threads=1)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Appends token arrays to NAME_000.bin, NAME_001.bin, ... (or one NAME.bin), each written
    under a hidden temporary name and renamed into place when complete."""

    def __init__(self, out_dir: Path, name: str, shard_tokens: int | None):
        self.out_dir, self.name, self.shard_tokens = out_dir, name, shard_tokens
        self.files: list[str] = []
        self.n_tokens = 0
        self._f = None
        self._in_shard = 0

    def _open(self):
        fname = f"{self.name}_{len(self.files):03d}.bin" if self.shard_tokens else f"{self.name}.bin"
        self.files.append(fname)
        self._tmp = self.out_dir / f".{fname}.tmp{os.getpid()}"
        self._f = open(self._tmp, "wb")
        self._in_shard = 0

    def write(self, tokens: np.ndarray):
        if self._f is None:
            self._open()
        self._f.write(tokens.tobytes())
        self._in_shard += tokens.size
        self.n_tokens += tokens.size
        if self.shard_tokens and self._in_shard >= self.shard_tokens:
            self.close()

    def close(self):
        if self._f is None and not self.shard_tokens and not self.files:
            self._open()  # an empty val.bin still exists, so the layout is always the same
        if self._f is not None:
            self._f.close()
            os.replace(self._tmp, self.out_dir / self.files[-1])
            self._f = None

    def abort(self):
        if self._f is not None:
            self._f.close()
            self._tmp.unlink(missing_ok=True)


def pretokenize(tokenizer, input, out_dir, val_fraction: float = 0.01, workers: int | None = None,
                split_on: str = "auto", text_field: str | None = None, dtype: str = "auto",
                shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Tokenize a corpus into DIR/train_NNN.bin, DIR/val.bin and DIR/meta.json; return the meta.

    Every document is encoded with BOS (id 1) in front. Documents are encoded in `workers`
    processes but written in corpus order, so the output does not depend on the worker count.
    Shards end at document boundaries once they reach `shard_tokens` tokens.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    sp = load_sentencepiece(tokenizer)
    vocab_size = sp.vocab_size()
    bos = sp.bos_id()
    if bos < 0:
        raise TokenizerError(f"{tokenizer}: expected a BOS piece <s>, found none")
    np_dtype = token_dtype(vocab_size, dtype)
    docs = iter_documents(input, split_on, text_field)  # raises on a missing corpus right away
    first = next(docs, None)
    if first is None:  # checked before anything is written
        raise DataError(f"{input}: corpus holds no documents (expected non-empty text)")
    docs = itertools.chain([first], docs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    meta_path.unlink(missing_ok=True)  # from here on the directory is marked incomplete

    train = _ShardWriter(out_dir, "train", shard_tokens)
    val = _ShardWriter(out_dir, "val", None)
    n_docs = [0, 0]  # train, val
    pool = None
    try:
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer),))
            encoded = pool.imap(_encode_batch, _batches(docs, _BATCH_DOCS))
        else:
            _init_worker(str(tokenizer))
            encoded = map(_encode_batch, _batches(docs, _BATCH_DOCS))
        bar = _progress(desc="pretokenize", unit="docs")
        index = 0
        for batch in encoded:
            for ids in batch:
                to_val = val_fraction > 0 and is_val_document(index, val_fraction)
                (val if to_val else train).write(np.array([bos, *ids], dtype=np_dtype))
                n_docs[to_val] += 1
                index += 1
            bar.update(len(batch))
        bar.close()
        train.close()
        val.close()
    except BaseException:
        train.abort()
        val.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if train.n_tokens == 0:
        raise DataError(f"{input}: no training tokens: all {index} documents went to validation; "
                        "use more text or a smaller --val-fraction")
    for stale in out_dir.glob("train_*.bin"):  # shards of an earlier, larger run
        if stale.name not in train.files:
            stale.unlink()
    meta = {
        "format": META_FORMAT,
        "version": 1,
        "vocab_size": vocab_size,
        "dtype": np_dtype.name,
        "bos_id": bos,
        "n_train_tokens": train.n_tokens,
        "n_val_tokens": val.n_tokens,
        "n_train_documents": n_docs[0],
        "n_val_documents": n_docs[1],
        "train_shards": train.files,
        "val_shards": val.files,
        "val_fraction": val_fraction,
        "tokenizer": str(Path(tokenizer).resolve()),
        "source": str(Path(input).resolve()),
        "split_on": split_on,
        "text_field": text_field,
    }
    atomic_write(meta_path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return meta


# ---------------------------------------------------------------------------------------------
# TokenWindows: the training batches


def read_meta(data_dir) -> dict:
    """Read and check DIR/meta.json (shards present, sizes matching the token counts)."""
    data_dir = Path(data_dir)
    hint = "run `babyllama data pretokenize` first"
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such token directory; {hint}")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir}: no meta.json (missing or incomplete token directory); {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: invalid JSON ({e})") from None
    need = ("vocab_size", "dtype", "train_shards", "val_shards", "n_train_tokens", "n_val_tokens")
    missing = [k for k in need if k not in meta]
    if meta.get("format") != META_FORMAT or missing:
        raise DataError(f"{meta_path}: expected a {META_FORMAT} meta.json with keys {', '.join(need)}, "
                        f"found format={meta.get('format')!r}, missing {missing}")
    itemsize = token_dtype(meta["vocab_size"], meta["dtype"]).itemsize
    for split in ("train", "val"):
        total = 0
        for name in meta[f"{split}_shards"]:
            p = data_dir / name
            if not p.is_file():
                raise DataError(f"{data_dir}: shard {name} listed in meta.json is missing; {hint}")
            total += p.stat().st_size
        if total != meta[f"n_{split}_tokens"] * itemsize:
            raise DataError(f"{data_dir}: {split} shards hold {total} bytes, meta.json expects "
                            f"{meta[f'n_{split}_tokens']} {meta['dtype']} tokens; {hint}")
    return meta


class TokenWindows:
    """Random windows of seq_len+1 tokens from pretokenized shards, as (x, y) batches.

    The global batch at a step is a function of (seed, step) only: batch_size window starts
    drawn uniformly over all valid positions by a NumPy Generator seeded with (seed, step).
    Rank r of world_size gets rows [r*B/W, (r+1)*B/W) of it, so a W-process data-parallel run
    trains on exactly the batches of a 1-process run. Shards are memory-mapped, never loaded.
    """

    def __init__(self, data_dir, split: str, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if split not in ("train", "val"):
            raise DataError(f"unknown split {split!r}: expected 'train' or 'val'")
        if seq_len < 1 or batch_size < 1 or world_size < 1:
            raise DataError(f"seq_len, batch_size and world_size must be positive, got {seq_len}, {batch_size}, {world_size}")
        if batch_size % world_size:
            raise DataError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, {world_size}), got {rank}")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        meta = read_meta(data_dir)
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.local_batch_size = batch_size // world_size
        self.vocab_size: int = meta["vocab_size"]
        self.dtype = token_dtype(self.vocab_size, meta["dtype"])
        self.n_tokens: int = meta[f"n_{split}_tokens"]
        self._shards = [
            np.memmap(self.data_dir / name, dtype=self.dtype, mode="r")
            for name in meta[f"{split}_shards"]
            if (self.data_dir / name).stat().st_size > 0  # an empty file cannot be mapped
        ]
        # a window needs seq_len+1 tokens inside one shard: len - seq_len valid start positions
        starts = np.array([max(0, len(s) - seq_len) for s in self._shards], dtype=np.int64)
        self._ends = np.cumsum(starts)
        self._firsts = self._ends - starts
        self._n_starts = int(self._ends[-1]) if len(starts) else 0
        if self._n_starts == 0:
            biggest = max((len(s) for s in self._shards), default=0)
            raise DataError(f"{self.data_dir} ({split}): corpus smaller than one window: "
                            f"{biggest} tokens, need seq_len+1 = {seq_len + 1}")

    def global_starts(self, step: int) -> np.ndarray:
        """The batch_size window starts of the whole (all-ranks) batch at `step`, as global positions."""
        if step < 0:
            raise DataError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng((self.seed, step))
        return rng.integers(0, self._n_starts, size=self.batch_size, dtype=np.int64)

    def batch(self, step: int):
        """(x, y): int64 torch tensors (batch_size // world_size, seq_len); y is x shifted by one."""
        import torch  # lazily: data preparation works without torch

        lo = self.rank * self.local_batch_size
        starts = self.global_starts(step)[lo : lo + self.local_batch_size]
        shard = np.searchsorted(self._ends, starts, side="right")
        offsets = starts - self._firsts[shard]
        rows = np.stack([self._shards[s][o : o + self.seq_len + 1] for s, o in zip(shard, offsets)]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def __repr__(self) -> str:
        return (f"TokenWindows({str(self.data_dir)!r}, {self.split!r}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, tokens={self.n_tokens}, rank={self.rank}/{self.world_size})")


# ---------------------------------------------------------------------------------------------
# command line: babyllama data ...


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="babyllama data", description="Get a corpus, train a vocabulary, pretokenize.")
    sub = p.add_subparsers(dest="command", required=True)

    def corpus_options(sp):
        sp.add_argument("--input", required=True, help="a .txt/.jsonl/.json file or a folder of them")
        sp.add_argument("--split-on", default="auto", choices=SPLIT_MODES,
                        help="how .txt files are cut into documents (default: auto = tinystories for a file, "
                             "none (file = document) inside a folder)")
        sp.add_argument("--text-field", default=None,
                        help=f"JSON field holding the text (default: the first of {', '.join(DEFAULT_TEXT_FIELDS)})")

    d = sub.add_parser("download", help="download and unpack a corpus (resumable)")
    d.add_argument("name", nargs="?", help=f"a known dataset: {', '.join(DATASETS)} (or give --url)")
    d.add_argument("--url", help="download this URL instead of the dataset's own")
    d.add_argument("--sha256", help="expected sha256 of the downloaded file")
    d.add_argument("--out", default="data", help="folder to download into (default: data)")
    d.add_argument("--no-unpack", action="store_true", help="keep the archive packed")

    v = sub.add_parser("train-vocab", help="train a sentencepiece BPE vocabulary -> tokN.model + tokN.bin")
    v.add_argument("--vocab-size", type=int, required=True)
    corpus_options(v)
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--max-documents", type=int, default=None, help="train on the first N documents only")

    t = sub.add_parser("pretokenize", help="corpus -> train/val token shards + meta.json")
    t.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    corpus_options(t)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--val-fraction", type=float, default=0.01)
    t.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    t.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"))
    t.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)

    e = sub.add_parser("export-tokenizer", help="sentencepiece .model -> tokenizer.bin")
    e.add_argument("model")
    e.add_argument("out")
    return p


def main(argv=None) -> int:
    """Entry point of `babyllama data`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "download":
            if args.url:
                url, sha = args.url, args.sha256
            elif args.name in DATASETS:
                url, sha = DATASETS[args.name].url, args.sha256 or DATASETS[args.name].sha256
            else:
                raise DataError(f"unknown dataset {args.name!r}: expected one of {', '.join(DATASETS)}, or give --url")
            print(download(url, args.out, sha, unpack=not args.no_unpack))
        elif args.command == "train-vocab":
            model, bin_ = train_vocab(args.vocab_size, args.input, args.out, args.split_on, args.text_field,
                                      args.max_documents)
            print(f"wrote {model} and {bin_}")
        elif args.command == "pretokenize":
            meta = pretokenize(args.tokenizer, args.input, args.out, args.val_fraction, args.workers,
                               args.split_on, args.text_field, args.dtype, args.shard_tokens)
            print(f"wrote {args.out}: {meta['n_train_tokens']} train tokens in {len(meta['train_shards'])} shard(s), "
                  f"{meta['n_val_tokens']} val tokens, vocab {meta['vocab_size']} ({meta['dtype']})")
        else:
            print(export_tokenizer(args.model, args.out))
    except BabyLlamaError as e:
        print(f"babyllama data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
