"""Token shards: corpus -> DIR/train_000.bin ..., DIR/val.bin, DIR/meta.json, and the batch loader.

Shard format: raw little-endian token ids (uint16 when the vocabulary fits, else uint32), every
document preceded by BOS, no header. meta.json describes the directory and is written last,
so a directory without it is incomplete. TokenWindows draws the trainer's random (x, y) windows.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import DataError, OutputError, TokenizerError
from ..fileio import check_output, make_folder, write_bytes
from .corpus import iter_documents, progress_bar
from .vocab import load_sentencepiece

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
    under a hidden temporary name and renamed into place when complete. Shards stream in over
    many writes, so this is fileio.atomic_write's scheme by hand, with its output checks."""

    def __init__(self, out_dir: Path, name: str, shard_tokens: int | None, inputs):
        self.out_dir, self.name, self.shard_tokens, self.inputs = out_dir, name, shard_tokens, inputs
        self.files: list[str] = []
        self.n_tokens = 0
        self._f = None
        self._in_shard = 0

    def _open(self):
        fname = f"{self.name}_{len(self.files):03d}.bin" if self.shard_tokens else f"{self.name}.bin"
        check_output(self.out_dir / fname, self.inputs)
        self.files.append(fname)
        self._tmp = self.out_dir / f".{fname}.tmp{os.getpid()}"
        self._f = open(self._tmp, "wb")
        self._in_shard = 0

    @contextlib.contextmanager
    def _os_errors(self):
        try:
            yield
        except OSError as e:  # the disk filling up, the folder vanishing, ...
            raise OutputError(f"{self.out_dir}: cannot write token shards ({e.strerror or e})") from None

    def write(self, tokens: np.ndarray):
        with self._os_errors():
            if self._f is None:
                self._open()
            self._f.write(tokens.tobytes())
        self._in_shard += tokens.size
        self.n_tokens += tokens.size
        if self.shard_tokens and self._in_shard >= self.shard_tokens:
            self.close()

    def close(self):
        with self._os_errors():
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
    Shards end at document boundaries once they reach `shard_tokens` tokens. out_dir may exist or
    be created (one level); it must not be the corpus or the tokenizer.
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
    inputs = [tokenizer, input]
    out_dir = make_folder(out_dir, inputs)
    meta_path = check_output(out_dir / "meta.json", inputs)
    meta_path.unlink(missing_ok=True)  # from here on the directory is marked incomplete

    train = _ShardWriter(out_dir, "train", shard_tokens, inputs)
    val = _ShardWriter(out_dir, "val", None, inputs)
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
        bar = progress_bar(desc="pretokenize", unit="docs")
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
    write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode(), inputs)
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

    def batch_numpy(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): int64 arrays (batch_size // world_size, seq_len); y is x shifted by one. What
        the torch-free trainer (training/grad) reads; `batch` is the same as torch tensors."""
        lo = self.rank * self.local_batch_size
        starts = self.global_starts(step)[lo : lo + self.local_batch_size]
        shard = np.searchsorted(self._ends, starts, side="right")
        offsets = starts - self._firsts[shard]
        rows = np.stack([self._shards[s][o : o + self.seq_len + 1] for s, o in zip(shard, offsets)]).astype(np.int64)
        return rows[:, :-1].copy(), rows[:, 1:].copy()

    def batch(self, step: int):
        """(x, y): int64 torch tensors (batch_size // world_size, seq_len); y is x shifted by one."""
        import torch  # lazily: data preparation works without torch

        x, y = self.batch_numpy(step)
        return torch.from_numpy(x), torch.from_numpy(y)

    def __repr__(self) -> str:
        return (f"TokenWindows({str(self.data_dir)!r}, {self.split!r}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, tokens={self.n_tokens}, rank={self.rank}/{self.world_size})")
