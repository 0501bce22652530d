"""Run state: the KV cache of up to n_slots sequences, in pages of 16 positions, and the scratch
buffers of one forward call. Weights live elsewhere (read-only); everything that changes while
generating lives here.

The cache is a pool of pages shared by the slots. A page holds 16 consecutive positions of one
sequence for every layer and key/value head (kernels.store_kv has the layout); a slot's block
table maps each block of 16 positions to its page. A sequence holds only the pages its positions
need (`reserve`), gives back what it no longer needs (`truncate`, after a rejected speculative
draft) and everything when it leaves (`release`). A single-sequence state gets all its pages
up front, so decoding never allocates. np.zeros maps the pool lazily: pages no sequence has
touched cost address space, not memory.
"""

from __future__ import annotations

from collections import namedtuple

import numba
import numpy as np

from ..config import ModelConfig
from ..errors import GenerationError

PAGE = 16  # positions per page: one tile of the attention's score kernel (ofast.dot16_columns)

# The per-call buffers, rows = token rows of one forward call (grown on demand, never per token).
Scratch = namedtuple("Scratch", "x xb xb2 q k v att_out hb hb2 xq xs xsum hq hs hsum xt xst xsumt att")


class State:
    """KV cache pages for n_slots sequences plus scratch; `pos` is slot 0's length (the
    single-sequence API's position)."""

    def __init__(self, cfg: ModelConfig, n_slots: int = 1, n_pages: int | None = None, group_size: int = 0,
                 rows: int = 1, fixed: bool | None = None):
        self.config = cfg
        self.n_slots = int(n_slots)
        self.blocks = -(-cfg.seq_len // PAGE)  # blocks of a full context
        n_pages = self.n_slots * self.blocks if n_pages is None else int(n_pages)
        if self.n_slots < 1 or n_pages < 1:
            raise GenerationError(f"a state needs at least one slot and one page, got {n_slots} and {n_pages}")
        f32 = np.float32
        L, g, hs = cfg.n_layers, cfg.n_kv_heads, cfg.head_size
        self.key_pages = np.zeros((L, n_pages, g, hs, PAGE), f32)  # (layer, page, kv head, head_size, position)
        self.value_pages = np.zeros((L, n_pages, g, PAGE, hs), f32)  # (layer, page, kv head, position, head_size)
        self.block_table = np.zeros((self.n_slots, self.blocks), np.int32)  # page of each block of each slot
        self.lengths = np.zeros(self.n_slots, np.int64)  # positions each slot holds
        self._pages = [[] for _ in range(self.n_slots)]  # pages owned by each slot, in block order
        self.owned = np.zeros(self.n_slots, np.int64)  # how many (for vectorized checks)
        self._free = list(range(n_pages - 1, -1, -1))
        self.cache = (self.key_pages, self.value_pages, self.block_table)  # the forward's cache argument
        if fixed is None:  # one sequence with room for its context: all its pages now, and kept
            fixed = self.n_slots == 1 and n_pages >= self.blocks
        self.fixed = fixed
        if self.fixed:
            self.reserve(0, cfg.seq_len)
        self.group_size = int(group_size)
        self.att_row = PAGE * self.blocks  # attention scores of one head: every position of a context
        self.scratch = None
        self.rows = 0
        self.ensure_rows(rows)
        self.logits = np.zeros((1, cfg.vocab_size), f32)  # the decode step's output, reused
        self._step = (np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32))  # its token row

    # -------------------------------------------------------------------- positions and pages

    @property
    def pos(self) -> int:
        return int(self.lengths[0])

    @pos.setter
    def pos(self, value: int) -> None:
        self.lengths[0] = value

    @property
    def n_pages(self) -> int:
        return self.key_pages.shape[1]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, n_positions: int) -> int:
        return -(-n_positions // PAGE)

    def reserve(self, slot: int, n_positions: int) -> None:
        """Make room for positions 0..n_positions-1 of a slot (GenerationError when the pool is out
        of pages or the context is exceeded)."""
        if n_positions > self.config.seq_len:
            raise GenerationError(f"{n_positions} positions exceed the model's context of {self.config.seq_len}")
        owned = self._pages[slot]
        need = self.pages_for(n_positions) - len(owned)
        if need <= 0:
            return
        if need > len(self._free):
            raise GenerationError(f"the KV cache is full: {need} more pages needed, {len(self._free)} free")
        for _ in range(need):
            page = self._free.pop()
            self.block_table[slot, len(owned)] = page
            owned.append(page)
        self.owned[slot] = len(owned)

    def truncate(self, slot: int, n_positions: int) -> None:
        """Forget a slot's positions from n_positions on (a speculative draft that was rejected):
        attention never reads past a row's own position, so the stale entries need no clearing;
        whole pages past the end go back to the pool (a single-sequence state keeps its pages)."""
        self.lengths[slot] = min(int(self.lengths[slot]), n_positions)
        if not self.fixed:
            owned = self._pages[slot]
            while len(owned) > self.pages_for(n_positions):
                self._free.append(owned.pop())
            self.owned[slot] = len(owned)

    def release(self, slot: int) -> None:
        """A sequence left: its slot is empty again (its pages go back to the pool)."""
        self.truncate(slot, 0)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the cache pool (keys and values of every page)."""
        return self.key_pages.nbytes + self.value_pages.nbytes

    def kv_bytes_used(self) -> int:
        """Bytes of the pages the slots hold now."""
        per_page = self.kv_bytes // self.n_pages
        return per_page * sum(len(p) for p in self._pages)

    # -------------------------------------------------------------------- scratch

    def ensure_rows(self, rows: int) -> Scratch:
        """Scratch for forward calls of up to `rows` token rows (reallocated only when a call needs
        more rows than any before)."""
        if rows > self.rows:
            cfg, f32 = self.config, np.float32
            gs = self.group_size or 1
            act = max(cfg.dim, cfg.q_dim)
            widest = max(act, cfg.hidden_dim)
            padded = -(-rows // 16) * 16  # qgemm's blocks of 16 tokens
            threads = numba.config.NUMBA_NUM_THREADS
            self.scratch = Scratch(
                x=np.zeros((rows, cfg.dim), f32),  # residual stream
                xb=np.zeros((rows, cfg.dim), f32),  # normalized input of a block
                xb2=np.zeros((rows, cfg.dim), f32),  # projection output before the residual add
                # GPT-2's fused projection writes q|k|v here; its queries are the first q_dim columns
                q=np.zeros((rows, 3 * cfg.dim if cfg.arch == "gpt2" else cfg.q_dim), f32),
                k=np.zeros((rows, cfg.kv_dim), f32),  # this position's key and value before caching
                v=np.zeros((rows, cfg.kv_dim), f32),
                att_out=np.zeros((rows, cfg.q_dim), f32),  # attention output, heads concatenated
                hb=np.zeros((rows, cfg.hidden_dim), f32),  # SwiGLU hidden activations (w1 @ x, then gated)
                hb2=np.zeros((rows, cfg.hidden_dim), f32),  # w3 @ x
                xq=np.zeros((rows, act), np.int8),  # quantized activations (int8/int4 engines)
                xs=np.zeros((rows, act // gs), f32),  # their scales and group sums
                xsum=np.zeros((rows, act // gs), np.int32),
                hq=np.zeros((rows, cfg.hidden_dim), np.int8),
                hs=np.zeros((rows, cfg.hidden_dim // gs), f32),
                hsum=np.zeros((rows, cfg.hidden_dim // gs), np.int32),
                xt=np.zeros(padded * widest, np.int8),  # those of one matmul laid out for qgemm
                xst=np.zeros(padded * (widest // gs), f32),
                xsumt=np.zeros(padded * (widest // gs), np.int32),
                att=np.zeros(threads * cfg.n_heads * self.att_row, f32),  # scores: (thread, head, position), flat
            )
            self.scratch_args = tuple(self.scratch)  # the forward's scratch argument (a plain tuple)
            self.rows = rows
        return self.scratch

    @property
    def nbytes(self) -> int:
        return self.kv_bytes + sum(a.nbytes for a in self.scratch) + self.logits.nbytes
