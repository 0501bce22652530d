"""Sampling the next token from logits: llama2.c's sampler, bit for bit, plus a few extras.

run.c's path (reproduced exactly, all arithmetic in float32 like the C code):
  temperature 0      -> argmax (the first maximum); the RNG is not touched.
  otherwise          -> logits /= temperature; softmax; coin = next_f32() from a xorshift RNG;
    0 < topp < 1     -> nucleus (top-p): keep probs >= (1 - topp) / (n - 1), sort descending,
                        take the shortest prefix whose cumulative probability exceeds topp, and
                        pick where that prefix's running sum first exceeds coin * its total;
    else             -> multinomial: the first index where the running sum exceeds coin.

Extras, all off by default (and then the result is exactly run.c's):
  repetition_penalty > 1 -> CTRL-style (Keskar et al. 2019): before anything else, each distinct
                            token of the history has its logit divided by the penalty if
                            positive, multiplied if negative (so it always becomes less likely).
  minp in (0, 1)         -> after softmax, drop tokens with prob < minp * max prob.
  topk > 0               -> after softmax, keep only the k most likely tokens.
  After min-p/top-k the kept probabilities are renormalised, then top-p or multinomial runs on them.

OpenAI's logits processing (LogitsProcessor: logit_bias, presence and frequency penalties) and
log-probabilities (log_softmax, top_logprobs) are separate steps a caller runs on the logits before
the sampler; a sequence that uses neither samples exactly as above.

Everything per-token is a Numba function working on caller-owned scratch arrays, so the engine's
own compiled loop can call `sample` directly; `Sampler` is the Python-facing wrapper. fastmath is
off on purpose: it would let LLVM reorder the float32 sums and change which token is picked.
"""

from __future__ import annotations

import math
import time

import numpy as np
from numba import njit

from .errors import GenerationError
from .simd.jit import JIT, entry
from .simd.ofast import softmax

# ---------------------------------------------------------------------------- RNG
# xorshift64* (Marsaglia 2003; Vigna 2016), as in run.c. All constants are typed uint64 so Numba
# keeps the arithmetic in wrapping 64-bit unsigned integers.
_U12 = np.uint64(12)
_U25 = np.uint64(25)
_U27 = np.uint64(27)
_U32 = np.uint64(32)
_U8 = np.uint64(8)
_MULT = np.uint64(0x2545F4914F6CDD1D)
_TWO_POW_24 = np.float32(16777216.0)


# Only what Python calls keeps machine code on disk (simd.jit.entry); the helpers are compiled
# into `sample`, which then inlines them (a helper loaded from the cache would be called opaquely).


@entry
def random_u32(rng_state):
    """Advance the xorshift state (a uint64 array of length 1) and return the next uint32."""
    s = rng_state[0]
    s ^= s >> _U12
    s ^= s << _U25
    s ^= s >> _U27
    rng_state[0] = s
    return np.uint32((s * _MULT) >> _U32)


@entry
def random_f32(rng_state):
    """A float32 uniform in [0, 1): the top 24 bits of random_u32 over 2**24."""
    return np.float32(np.uint64(random_u32(rng_state)) >> _U8) / _TWO_POW_24


@entry
def advance_rng(rng_state, n):
    """Advance the xorshift state by n draws (discarding them)."""
    for _ in range(n):
        random_u32(rng_state)


# ---------------------------------------------------------------------------- run.c's pieces


@njit(**JIT)
def sample_argmax(x):
    """Index of the first maximum of x."""
    best = 0
    best_val = x[0]
    for i in range(1, x.shape[0]):
        if x[i] > best_val:
            best = i
            best_val = x[i]
    return best


@njit(**JIT)
def softmax_inplace(x):
    """x <- softmax(x) in float32, as run.c's softmax() runs when built -Ofast (simd/ofast.py):
    max, expf(x - max) and their vectorized sum, then x * (1 / sum)."""
    softmax(x, 0, x.shape[0], False)


@njit(**JIT)
def sample_mult(probs, coin):
    """First index where the running sum of probs exceeds coin (the last index if none does)."""
    cdf = np.float32(0.0)
    n = probs.shape[0]
    for i in range(n):
        cdf += probs[i]
        if coin < cdf:
            return i
    return n - 1


@njit(**JIT)
def _ranks_before(p, a, b):
    """True if index a comes before index b in descending-probability order (ties: lower index).

    This is the order a stable sort by descending probability gives (glibc's qsort in run.c is
    a merge sort for these sizes, hence stable). With the index as tie-break the order is total,
    so a heap reproduces it exactly.
    """
    return p[a] > p[b] or (p[a] == p[b] and a < b)


@njit(**JIT)
def _sift_down(p, heap, root, end, worst_on_top):
    """Restore the heap property of heap[root:end] below `root`.

    worst_on_top=False: the best-ranked index is at heap[0] (used to pop in sorted order).
    worst_on_top=True: the worst-ranked index is at heap[0] (used to keep the k best).
    """
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end:
            if worst_on_top:
                if _ranks_before(p, heap[child], heap[child + 1]):
                    child += 1
            elif _ranks_before(p, heap[child + 1], heap[child]):
                child += 1
        if worst_on_top:
            higher = _ranks_before(p, heap[root], heap[child])
        else:
            higher = _ranks_before(p, heap[child], heap[root])
        if not higher:
            return
        tmp = heap[root]
        heap[root] = heap[child]
        heap[child] = tmp
        root = child


@njit(**JIT)
def sample_topp(probs, topp, coin, scratch):
    """run.c's nucleus sampling; `scratch` is an integer array at least as long as probs.

    Instead of qsorting every candidate, the candidates go into a heap and are popped best-first
    only until the cumulative probability exceeds topp: the same prefix, the same float32 sums in
    the same order, usually a handful of pops.
    """
    n = probs.shape[0]
    topp = np.float32(topp)
    # Tokens below this cannot be in the nucleus (their mass is too small to matter), so they are
    # dropped before sorting. run.c computes it in float32.
    cutoff = (np.float32(1.0) - topp) / np.float32(n - 1)
    n0 = 0
    for i in range(n):
        if probs[i] >= cutoff:
            scratch[n0] = i
            n0 += 1
    if n0 == 0:
        # Only possible for topp <= 1/n or NaN probs; run.c reads out of bounds here.
        return sample_argmax(probs)
    for start in range(n0 // 2 - 1, -1, -1):
        _sift_down(probs, scratch, start, n0, False)
    # Pop best-first; the k-th popped index lands at scratch[n0 - 1 - k].
    cumulative = np.float32(0.0)
    end = n0
    while end > 0:
        top = scratch[0]
        end -= 1
        scratch[0] = scratch[end]
        scratch[end] = top
        _sift_down(probs, scratch, 0, end, False)
        cumulative += probs[top]
        if cumulative > topp:
            break
    # The nucleus is scratch[n0-1], scratch[n0-2], ..., scratch[end], best first.
    r = coin * cumulative
    cdf = np.float32(0.0)
    for k in range(n0 - 1, end - 1, -1):
        cdf += probs[scratch[k]]
        if r < cdf:
            return scratch[k]
    return scratch[end]


# ---------------------------------------------------------------------------- extras


@njit(**JIT)
def apply_repetition_penalty(logits, history, penalty, scratch):
    """CTRL repetition penalty, once per distinct token of history (ids outside the vocab ignored).

    scratch (integers, len >= vocab) marks tokens already penalised; only the history's entries
    are touched, so nothing needs clearing.
    """
    n = logits.shape[0]
    for t in history:
        if 0 <= t < n:
            scratch[t] = 0
    for t in history:
        if 0 <= t < n and scratch[t] == 0:
            scratch[t] = 1
            if logits[t] > 0:
                logits[t] /= penalty
            else:
                logits[t] *= penalty


@njit(**JIT)
def _keep_top_k(probs, k, scratch):
    """Zero all but the k most likely entries of probs (ties: lower index first)."""
    n = probs.shape[0]
    # Min-heap of the k best seen so far, worst at scratch[0]: one comparison per rejected token.
    for i in range(k):
        scratch[i] = i
    for start in range(k // 2 - 1, -1, -1):
        _sift_down(probs, scratch, start, k, True)
    for i in range(k, n):
        if _ranks_before(probs, i, scratch[0]):
            scratch[0] = i
            _sift_down(probs, scratch, 0, k, True)
    # The order is total, so "kept" is exactly "ranks at or before the worst kept one".
    worst = scratch[0]
    for i in range(n):
        if i != worst and not _ranks_before(probs, i, worst):
            probs[i] = np.float32(0.0)


@njit(**JIT)
def _keep_min_p(probs, minp):
    """Zero the entries below minp times the largest probability."""
    threshold = minp * probs[sample_argmax(probs)]
    for i in range(probs.shape[0]):
        if probs[i] < threshold:
            probs[i] = np.float32(0.0)


@njit(**JIT)
def _renormalize(probs):
    total = np.float32(0.0)
    for i in range(probs.shape[0]):
        total += probs[i]
    for i in range(probs.shape[0]):
        probs[i] /= total


# ---------------------------------------------------------------------------- entry point


@entry
def sample(logits, history, temperature, topp, topk, minp, repetition_penalty, rng_state, scratch):
    """Pick the next token id from `logits` (float32, modified in place).

    history: integer array of earlier token ids (used only by the repetition penalty; may be empty).
    temperature, topp, minp, repetition_penalty: floats; topk: int (0 = off).
    rng_state: uint64 array of length 1 (advanced once per call unless temperature is 0).
    scratch: integer array (int64 preferred) at least as long as logits.
    """
    # The settings are float32 in run.c's Sampler struct; convert once so all math stays float32.
    temp32 = np.float32(temperature)
    topp32 = np.float32(topp)
    minp32 = np.float32(minp)
    penalty32 = np.float32(repetition_penalty)
    n = logits.shape[0]

    if penalty32 != np.float32(1.0) and history.shape[0] > 0:
        apply_repetition_penalty(logits, history, penalty32, scratch)
    if temp32 == np.float32(0.0):
        return sample_argmax(logits)

    inv_temp = np.float32(1.0) / temp32  # -Ofast turns run.c's logits[i] /= temperature into this
    for i in range(n):
        logits[i] *= inv_temp
    softmax_inplace(logits)
    coin = random_f32(rng_state)

    filtered = False
    if minp32 > np.float32(0.0):
        _keep_min_p(logits, minp32)
        filtered = True
    if 0 < topk < n:
        _keep_top_k(logits, topk, scratch)
        filtered = True
    if filtered:
        _renormalize(logits)

    if topp32 <= np.float32(0.0) or topp32 >= np.float32(1.0):
        next_id = sample_mult(logits, coin)
        if filtered and logits[next_id] == np.float32(0.0):
            # Rounding left coin above the total: run.c's "last index" may have been filtered
            # out, so take the last token still allowed.
            while next_id > 0 and logits[next_id] == np.float32(0.0):
                next_id -= 1
        return next_id
    return sample_topp(logits, topp32, coin, scratch)


# ---------------------------------------------------------------------------- Python wrapper


def _check_setting(ok: bool, name: str, accepted: str, value) -> None:
    if not ok:
        raise GenerationError(f"{name} must be {accepted}, got {value!r}")


class Sampler:
    """Picks token ids from logits with run.c's sampler (and optional extras).

    Sampler(vocab_size, temperature=1.0, topp=0.9, seed=None, topk=0, minp=0.0,
            repetition_penalty=1.0)
    seed None or 0 seeds from the clock like run.c (time(NULL)); the seed used is in `.seed`.
    Negative seeds wrap to unsigned 64-bit, as run.c's assignment of atoi() to an unsigned long long does.
    Raises GenerationError for settings outside their range.
    """

    def __init__(
        self,
        vocab_size: int,
        temperature: float = 1.0,
        topp: float = 0.9,
        seed: int | None = None,
        topk: int = 0,
        minp: float = 0.0,
        repetition_penalty: float = 1.0,
    ):
        _check_setting(
            _is_int(vocab_size) and vocab_size > 0, "vocab_size", "a positive integer", vocab_size
        )
        _check_setting(
            _is_real(temperature) and math.isfinite(temperature) and temperature >= 0,
            "temperature (-t)", "a finite number >= 0", temperature,
        )
        _check_setting(_is_real(topp) and 0 <= topp <= 1, "topp (-p)", "in [0, 1]", topp)
        _check_setting(_is_int(topk) and topk >= 0, "topk", "an integer >= 0 (0 = off)", topk)
        _check_setting(_is_real(minp) and 0 <= minp < 1, "minp", "in [0, 1) (0 = off)", minp)
        _check_setting(
            _is_real(repetition_penalty) and math.isfinite(repetition_penalty) and repetition_penalty > 0,
            "repetition_penalty", "a finite number > 0 (1 = off)", repetition_penalty,
        )
        _check_setting(seed is None or _is_int(seed), "seed (-s)", "an integer (0 or None = from the clock)", seed)

        self.vocab_size = int(vocab_size)
        self.temperature = float(np.float32(temperature))
        self.topp = float(np.float32(topp))
        self.topk = int(topk)
        self.minp = float(np.float32(minp))
        self.repetition_penalty = float(np.float32(repetition_penalty))
        seed = int(seed or 0) % 2**64
        if seed == 0:
            seed = int(time.time())  # run.c: (unsigned int)time(NULL)
        self.seed = seed
        self.rng_state = np.array([seed], dtype=np.uint64)
        self._scratch = np.empty(self.vocab_size, dtype=np.int64)
        self._no_history = np.empty(0, dtype=np.int64)

    @property
    def settings(self) -> tuple:
        """Everything but the random state: two samplers with equal settings and states agree."""
        return (self.vocab_size, self.temperature, self.topp, self.topk, self.minp, self.repetition_penalty)

    def __call__(self, logits: np.ndarray, history: np.ndarray | None = None) -> int:
        """The next token id. `logits` (float32, length vocab_size) is overwritten (with probabilities
        unless temperature is 0). `history`: earlier token ids, for the repetition penalty."""
        if logits.dtype != np.float32 or logits.shape != (self.vocab_size,):
            raise GenerationError(
                f"logits must be float32 of shape ({self.vocab_size},), got {logits.dtype} {logits.shape}"
            )
        if history is None:
            history = self._no_history
        elif not isinstance(history, np.ndarray):
            history = np.asarray(history, dtype=np.int64)
        return int(
            sample(
                logits, history, self.temperature, self.topp, self.topk, self.minp,
                self.repetition_penalty, self.rng_state, self._scratch,
            )
        )

    def skip(self, n: int) -> None:
        """Advance the RNG exactly as n calls whose result is discarded would.

        run.c's chat loop samples (and ignores) at every forced prompt position; each such call
        draws one coin, or none at temperature 0.
        """
        if self.temperature != 0.0 and n > 0:
            advance_rng(self.rng_state, int(n))

    def random_u32(self) -> int:
        """Advance this sampler's RNG and return the next uint32 (run.c's random_u32)."""
        return int(random_u32(self.rng_state))

    def random_f32(self) -> float:
        """Advance this sampler's RNG and return the next float32 in [0, 1) (run.c's random_f32)."""
        return float(random_f32(self.rng_state))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------- OpenAI's extras
# These run before the sampler, on one sequence's logits row, only for requests that ask for them
# (the server's logit_bias, presence_penalty, frequency_penalty, logprobs); NumPy is enough here.


class LogitsProcessor:
    """OpenAI's logit_bias and presence/frequency penalties, applied to a logits row in place.

    For each token j that was generated c[j] times so far (the completion only, not the prompt):
    logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, then logit[j] += bias[j]
    (OpenAI's formula, in float32). Bias values are OpenAI's range, [-100, 100].
    """

    def __init__(self, vocab_size: int, logit_bias: dict | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0):
        bias = dict(logit_bias or {})
        for token, value in bias.items():
            _check_setting(_is_int(token) and 0 <= token < vocab_size, "a logit_bias token id",
                           f"in [0, {vocab_size})", token)
            _check_setting(_is_real(value) and -100 <= value <= 100, "a logit_bias value", "in [-100, 100]", value)
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            _check_setting(_is_real(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        self.vocab_size = int(vocab_size)
        self.bias_ids = np.array(sorted(bias), dtype=np.int64)
        self.bias_values = np.array([bias[t] for t in sorted(bias)], dtype=np.float32)
        self.presence = np.float32(presence_penalty)
        self.frequency = np.float32(frequency_penalty)

    @property
    def active(self) -> bool:
        """False when it would change nothing (no bias, no penalty)."""
        return bool(self.bias_ids.size) or self.presence != 0 or self.frequency != 0

    def __call__(self, logits: np.ndarray, generated) -> None:
        """Adjust `logits` (float32, one row) for the tokens `generated` so far."""
        if (self.presence != 0 or self.frequency != 0) and len(generated):
            counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=self.vocab_size)
            seen = np.flatnonzero(counts)
            logits[seen] -= counts[seen].astype(np.float32) * self.frequency + self.presence
        if self.bias_ids.size:
            logits[self.bias_ids] += self.bias_values


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) in float64 (a copy: the sampler then overwrites the row)."""
    x = logits.astype(np.float64)
    x -= x.max()
    x -= math.log(np.exp(x).sum())
    return x


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs, most likely first."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[0])
    best = np.argpartition(-logprobs, k - 1)[:k]
    best = best[np.lexsort((best, -logprobs[best]))]
    return [(int(i), float(logprobs[i])) for i in best]
