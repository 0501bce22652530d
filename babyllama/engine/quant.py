"""The quantized engine: int8 (llama2.c v2, runq's math) and int4 (babyllama v3) inference.

    engine = QuantEngine.from_checkpoint(load_checkpoint("stories15M_q80.bin"))
    logits = engine.forward([1, 403], 0, engine.new_state())

Same interface as the fp32 Engine (generate, the CLI and bench use either). The forward is
runq's: the residual stream, norms, RoPE and attention stay float32; before every matmul the
activation vector is quantized per group to int8, and the matmul sums exact int32 group dot
products scaled by the weight and activation scales. The token embedding row is dequantized per
token (runq dequantizes the whole table at load: the same float32 values, without the
vocab x dim copy). The float kernels are the fp32 engine's: the operations gcc -Ofast
-march=native makes of llama2.c's C (kernels.py and ofast.py say why), so a v2 file gives that
runq's logits bit for bit, and its tokens for the same flags and seed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..quant import QuantMatrix, QuantWeights
from . import Engine, RunState, compiles_on_first_call
from .kernels import ENTRY, JIT, attention, rmsnorm, rope, silu_mul, store_kv
from .qkernels import dequantize_row, qmatmul, qmatmul2, qmatmul3, quantize_activations


class QuantRunState(RunState):
    """RunState plus the quantized activations (xq/xs for dim-sized, hq/hs for hidden-sized
    vectors)."""

    def __init__(self, cfg: ModelConfig, group_size: int):
        super().__init__(cfg)
        self.xq = np.zeros(cfg.dim, np.int8)
        self.xs = np.zeros(cfg.dim // group_size, np.float32)
        self.hq = np.zeros(cfg.hidden_dim, np.int8)
        self.hs = np.zeros(cfg.hidden_dim // group_size, np.float32)


def _m(q: QuantMatrix) -> tuple:
    """The (data, offsets, scales) triple the Numba forward takes for one matrix kind."""
    return (q.data, q.offsets, q.scales)


class QuantEngine(Engine):
    """Inference over group-quantized weights (QuantWeights from a v2/v3 file or from_float).

    Construction is Engine's; only the bytes streamed, the run state and the forward differ.
    """

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, parallel: bool | None = None) -> "QuantEngine":
        if not isinstance(ck.weights, QuantWeights):
            from ..errors import CheckpointError

            raise CheckpointError(f"{ck.path}: a v{ck.version} (fp32) model has no quantized weights; "
                                  "run it with the fp32 engine or `babyllama quantize` it first")
        return cls(ck.config, ck.weights, parallel)

    @property
    def bits(self) -> int:
        return self.weights.bits

    @property
    def group_size(self) -> int:
        return self.weights.group_size

    @property
    def weight_bytes(self) -> int:
        """Bytes one decode step streams: every matrix's values and scales (embedding: one row)."""
        w = self.weights
        total = sum(q.nbytes for n, q in w.matrices() if n not in ("token_embedding", "wcls"))
        emb = w.token_embedding
        total += w.wcls.nbytes + emb.cols * w.bits // 8 + 4 * (emb.cols // w.group_size)  # one embedding row
        return total + w.rms_att.nbytes + w.rms_ffn.nbytes + w.rms_final.nbytes

    def new_state(self) -> QuantRunState:
        return QuantRunState(self.config, self.group_size)

    @property
    def compiles_on_first_call(self) -> bool:
        return compiles_on_first_call(qforward)

    def _run(self, tokens: np.ndarray, pos: int, out: np.ndarray, state: QuantRunState) -> None:
        w = self.weights
        qforward(
            tokens, pos, out,
            w.rms_att, w.rms_ffn, w.rms_final, _m(w.token_embedding),
            _m(w.wq), _m(w.wk), _m(w.wv), _m(w.wo), _m(w.w1), _m(w.w2), _m(w.w3), _m(w.wcls),
            state.key_cache, state.value_cache, state.x, state.xb, state.xb2, state.q, state.k, state.v,
            state.hb, state.hb2, state.att, state.xq, state.xs, state.hq, state.hs, self.rope_cos, self.rope_sin,
            self.config.n_heads, self._eps, w.group_size, w.bits, self.parallel,
        )
        state.pos = pos + tokens.shape[0]


@njit(**JIT)
def _mm(out, m, l, xq, xs, gs, bits, parallel):
    """out = matrix l of the (data, offsets, scales) triple m, times the quantized vector."""
    qmatmul(out, m[0], m[1][l], m[2][l], xq, xs, gs, bits, parallel)


@njit(**ENTRY)
def qforward(
    tokens, pos0, logits_out,  # (T,) token ids at positions pos0..; (T or 1, vocab) output
    rms_att, rms_ffn, rms_final, token_embedding,  # fp32 norms; quantized matrices are
    wq, wk, wv, wo, w1, w2, w3, wcls,  # (data, offsets, scales) triples
    key_cache, value_cache, x, xb, xb2, q, k, v, hb, hb2, att, xq, xs, hq, hs, rope_cos, rope_sin,  # run state
    n_heads, eps, gs, bits, parallel,
):
    """runq's forward for T tokens (decode T=1, prefill T>1 one token after another)."""
    n_layers = rms_att.shape[0]
    dim = x.shape[0]
    kv_dim = k.shape[0]
    head_size = dim // n_heads
    for t in range(tokens.shape[0]):
        pos = pos0 + t
        cos = rope_cos[pos]  # (head_size/2,)
        sin = rope_sin[pos]
        dequantize_row(x, token_embedding[0], token_embedding[1][0], token_embedding[2][0], tokens[t], gs, bits)

        for l in range(n_layers):
            # attention: x -> rmsnorm -> quantize -> q, k, v -> RoPE -> attend -> quantize -> wo
            rmsnorm(xb, x, rms_att[l], eps, True)  # (dim,)
            quantize_activations(xq, xs, xb, gs)
            qmatmul3(q, k, v, wq[0], wq[1][l], wq[2][l], wk[0], wk[1][l], wk[2][l], wv[0], wv[1][l], wv[2][l],
                     xq, xs, gs, bits, parallel)  # (dim,), (kv_dim,), (kv_dim,)
            rope(q, n_heads, head_size, cos, sin)
            rope(k, kv_dim // head_size, head_size, cos, sin)
            store_kv(key_cache[l], value_cache[l], k, v, pos)
            attention(xb, q, key_cache[l], value_cache[l], att, pos, n_heads, parallel)  # (dim,)
            quantize_activations(xq, xs, xb, gs)
            _mm(xb2, wo, l, xq, xs, gs, bits, parallel)  # (dim,)
            for i in range(dim):
                x[i] += xb2[i]  # residual

            # feed-forward: x -> rmsnorm -> quantize -> SwiGLU -> quantize -> w2
            rmsnorm(xb, x, rms_ffn[l], eps, True)  # (dim,)
            quantize_activations(xq, xs, xb, gs)
            qmatmul2(hb, hb2, w1[0], w1[1][l], w1[2][l], w3[0], w3[1][l], w3[2][l], xq, xs, gs, bits, parallel)
            silu_mul(hb, hb2)  # (hidden,)
            quantize_activations(hq, hs, hb, gs)
            _mm(xb2, w2, l, hq, hs, gs, bits, parallel)  # (dim,)
            for i in range(dim):
                x[i] += xb2[i]  # residual

        if logits_out.shape[0] == tokens.shape[0] or t == tokens.shape[0] - 1:
            row = t if logits_out.shape[0] == tokens.shape[0] else 0
            rmsnorm(xb, x, rms_final, eps, False)  # (dim,) (runq normalizes x in place; same values)
            quantize_activations(xq, xs, xb, gs)
            _mm(logits_out[row], wcls, 0, xq, xs, gs, bits, parallel)  # (vocab,)
