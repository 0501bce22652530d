"""The fp32 forward pass: run.c's `forward`, one Numba function from embedding to logits."""

from numba import njit

from .kernels import (
    ENTRY,
    attention,
    matmul,
    matmul2,
    matmul3,
    rmsnorm,
    rope,
    silu_mul,
    store_kv,
)


@njit(**ENTRY)
def forward(
    tokens, pos0, logits_out,  # (T,) token ids at positions pos0..pos0+T-1; (T or 1, vocab) output
    token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, wcls,  # weights
    key_cache, value_cache, x, xb, xb2, q, k, v, hb, hb2, att, rope_cos, rope_sin,  # run state
    n_heads, eps, parallel, blocked,
):
    """Feed T tokens through the model, filling the KV cache; write logits.

    One call serves decode (T=1) and prefill (T>1, the tokens run one after another through the
    same code, so a prompt gives the cache exactly the values token-by-token decoding would).
    logits_out has T rows to get every position's logits, or 1 row for just the last one.
    """
    n_layers = wq.shape[0]
    dim = x.shape[0]
    kv_dim = wk.shape[1]
    head_size = dim // n_heads
    for t in range(tokens.shape[0]):
        pos = pos0 + t
        cos = rope_cos[pos]  # (head_size/2,)
        sin = rope_sin[pos]
        x[:] = token_embedding[tokens[t]]  # (dim,)

        for l in range(n_layers):
            # attention: x -> rmsnorm -> q, k, v -> RoPE -> attend over the cache -> wo
            rmsnorm(xb, x, rms_att[l], eps, True)  # (dim,)
            matmul3(q, k, v, wq[l], wk[l], wv[l], xb, parallel, blocked)  # (dim,), (kv_dim,), (kv_dim,)
            rope(q, n_heads, head_size, cos, sin)
            rope(k, kv_dim // head_size, head_size, cos, sin)
            store_kv(key_cache[l], value_cache[l], k, v, pos)
            attention(xb, q, key_cache[l], value_cache[l], att, pos, n_heads, parallel)  # (dim,)
            matmul(xb2, wo[l], xb, parallel, blocked)  # (dim,)
            for i in range(dim):
                x[i] += xb2[i]  # residual

            # feed-forward: x -> rmsnorm -> SwiGLU -> w2
            rmsnorm(xb, x, rms_ffn[l], eps, True)  # (dim,)
            matmul2(hb, hb2, w1[l], w3[l], xb, parallel, blocked)  # (hidden,), (hidden,)
            silu_mul(hb, hb2)  # (hidden,)
            matmul(xb2, w2[l], hb, parallel, blocked)  # (dim,)
            for i in range(dim):
                x[i] += xb2[i]  # residual

        if logits_out.shape[0] == tokens.shape[0] or t == tokens.shape[0] - 1:
            row = t if logits_out.shape[0] == tokens.shape[0] else 0
            rmsnorm(xb, x, rms_final, eps, False)  # (dim,)
            matmul(logits_out[row], wcls, xb, parallel, blocked)  # (vocab,)
