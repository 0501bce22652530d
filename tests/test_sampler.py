"""The sampler: run.c's xorshift RNG and sampling, bit for bit, plus the extras' semantics."""

import json
import math
import time

import numpy as np
import pytest
from conftest import libm_expf, shared_file, shared_fixture

from babyllama.errors import GenerationError
from babyllama.sampling import Sampler, random_f32, random_u32, sample

F32 = np.float32
MASK64 = 2**64 - 1


# ----------------------------------------------------------------------------- reference
# An independent transcription of run.c's sampler in Python: integers for the RNG, numpy
# float32 scalars for the arithmetic, the C library's expf, and Python's (stable) sort. It follows
# the -Ofast build's operations (x * (1/temperature), probabilities times 1/sum) except two that
# Python can't reach: libmvec's vector expf and the vectorized order of the sum (engine/ofast.py,
# tested in test_ofast.py). Those move probabilities by an ulp or so; the sampled token is compared.


class RefRng:
    def __init__(self, seed):
        self.state = seed & MASK64

    def u32(self):
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & MASK64) >> 32

    def f32(self):
        return F32(self.u32() >> 8) / F32(16777216.0)


def ref_sample(logits, temperature, topp, rng, expf):
    x = [F32(v) for v in logits]
    n = len(x)
    temperature, topp = F32(temperature), F32(topp)
    if temperature == 0:
        return max(range(n), key=lambda i: (x[i], -i))  # first maximum
    inv_temp = F32(1.0) / temperature
    x = [v * inv_temp for v in x]
    m = max(x)
    e = [F32(expf(float(v - m))) for v in x]
    total = F32(0.0)
    for v in e:
        total += v
    inv = F32(1.0) / total
    p = [v * inv for v in e]
    coin = rng.f32()
    if topp <= 0 or topp >= 1:
        cdf = F32(0.0)
        for i in range(n):
            cdf += p[i]
            if coin < cdf:
                return i
        return n - 1
    cutoff = (F32(1.0) - topp) / F32(n - 1)
    kept = sorted((i for i in range(n) if p[i] >= cutoff), key=lambda i: -p[i])
    cum, last = F32(0.0), len(kept) - 1
    for k, i in enumerate(kept):
        cum += p[i]
        if cum > topp:
            last = k
            break
    r = coin * cum
    cdf = F32(0.0)
    for i in kept[: last + 1]:
        cdf += p[i]
        if r < cdf:
            return i
    return kept[last]


def random_logits(rng, n, scale):
    logits = (rng.standard_normal(n) * scale).astype(np.float32)
    dup = rng.integers(0, n, size=n // 8)  # equal logits exercise the tie order of the sort
    logits[dup] = logits[dup[0]]
    return logits


# ----------------------------------------------------------------------------- RNG


@pytest.mark.parametrize("seed", [1, 42, 133742, 2**32 + 5, MASK64])
def test_xorshift_sequence(seed):
    ref = RefRng(seed)
    sampler = Sampler(8, seed=seed)
    assert [sampler.random_u32() for _ in range(20)] == [ref.u32() for _ in range(20)]
    assert [sampler.random_f32() for _ in range(20)] == [float(ref.f32()) for _ in range(20)]


def test_xorshift_known_first_value():
    # Worked by hand for seed 1: s = 1 ^ (1 << 25) = 0x2000001, then s ^= s >> 27 (no change),
    # and (0x2000001 * 0x2545F4914F6CDD1D mod 2**64) >> 32.
    s = 0x2000001
    expected = ((s * 0x2545F4914F6CDD1D) % 2**64) >> 32
    state = np.array([1], dtype=np.uint64)
    assert int(random_u32(state)) == expected
    assert int(state[0]) == s
    assert 0.0 <= float(random_f32(state)) < 1.0


def test_seed_zero_or_none_uses_clock_and_negative_wraps():
    now = int(time.time())
    for seed in (None, 0):
        assert abs(Sampler(8, seed=seed).seed - now) <= 2
    assert Sampler(8, seed=-5).seed == 2**64 - 5  # run.c: atoi() stored in an unsigned long long


def test_skip_advances_like_discarded_samples():
    logits = np.array([0.3, 0.1, 0.2, 0.4], dtype=np.float32)
    skipped = Sampler(4, temperature=1.0, topp=0.0, seed=11)
    drawn = Sampler(4, temperature=1.0, topp=0.0, seed=11)
    skipped.skip(5)
    for _ in range(5):
        drawn(logits.copy())  # results discarded, as in run.c's chat loop over the prompt
    assert int(skipped.rng_state[0]) == int(drawn.rng_state[0]) != 11
    greedy = Sampler(4, temperature=0.0, seed=11)
    greedy.skip(5)
    assert int(greedy.rng_state[0]) == 11  # no coin is drawn at temperature 0


# ----------------------------------------------------------------------------- run.c paths


def test_greedy_picks_first_maximum_and_keeps_rng():
    sampler = Sampler(6, temperature=0.0, seed=9)
    logits = np.array([0.5, 2.0, -1.0, 2.0, 1.0, 2.0], dtype=np.float32)
    assert sampler(logits) == 1
    assert int(sampler.rng_state[0]) == 9  # run.c draws no coin at temperature 0
    assert sampler(np.full(6, -np.inf, dtype=np.float32)) == 0


@pytest.mark.parametrize("topp", [0.9, 0.5, 0.99, 0.0, 1.0])
def test_matches_reference_implementation(topp):
    """Same token and same RNG state as a Python transcription of run.c, on many random cases."""
    expf = libm_expf()
    rng = np.random.default_rng(int(topp * 100))
    for seed in range(1, 81):
        n = 512 if seed % 10 else 1000
        logits = random_logits(rng, n, scale=rng.choice([0.5, 2.0, 6.0]))
        temperature = float(rng.choice([1.0, 0.8, 0.3, 1.7]))
        sampler = Sampler(n, temperature=temperature, topp=topp, seed=seed)
        ref = RefRng(seed)
        for _ in range(3):  # consecutive draws also check that each call advances the RNG once
            want = ref_sample(logits, temperature, topp, ref, expf)
            assert sampler(logits.copy()) == want, (seed, temperature)
        assert int(sampler.rng_state[0]) == ref.state


def test_topp_keeps_sampling_inside_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: with topp 0.7 the nucleus is {0, 1}.
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    sampler = Sampler(4, temperature=1.0, topp=0.7, seed=3)
    picks = {sampler(logits.copy()) for _ in range(300)}
    assert picks == {0, 1}


def test_njit_entry_point_direct_call():
    """The engine may call `sample` from its own compiled code with its own scratch arrays."""
    logits = np.array([0.1, 3.0, 0.2], dtype=np.float32)
    state = np.array([7], dtype=np.uint64)
    scratch = np.empty(3, dtype=np.int64)
    history = np.empty(0, dtype=np.int64)
    assert sample(logits.copy(), history, 0.0, 0.9, 0, 0.0, 1.0, state, scratch) == 1
    ref = RefRng(7)
    want = ref_sample(logits, 1.0, 0.9, ref, libm_expf())
    assert sample(logits.copy(), history, 1.0, 0.9, 0, 0.0, 1.0, state, scratch) == want
    assert int(state[0]) == ref.state


# ----------------------------------------------------------------------------- extras


def test_extras_off_or_no_op_equal_runc_path():
    rng = np.random.default_rng(5)
    for seed in range(1, 30):
        logits = random_logits(rng, 512, 3.0)
        plain = Sampler(512, temperature=1.0, topp=0.9, seed=seed)
        noop = Sampler(512, temperature=1.0, topp=0.9, seed=seed, topk=512, repetition_penalty=1.0)
        history = rng.integers(0, 512, size=50)
        assert plain(logits.copy()) == noop(logits.copy(), history)


def test_topk_keeps_k_most_likely_and_renormalizes():
    rng = np.random.default_rng(11)
    for seed in range(1, 40):
        logits = random_logits(rng, 200, 2.0)
        for topp in (0.0, 0.9):
            sampler = Sampler(200, temperature=1.0, topp=topp, topk=5, seed=seed)
            probs = logits.copy()
            token = sampler(probs)  # probs now holds the filtered, renormalized distribution
            # the 5 best by (logit desc, index asc): ties resolved towards the lower index
            top5 = sorted(range(200), key=lambda i: (-logits[i], i))[:5]
            assert set(np.flatnonzero(probs)) == set(top5)
            assert token in top5
            assert abs(float(probs.sum()) - 1.0) < 1e-5
            full = np.exp(logits - logits.max())
            np.testing.assert_allclose(probs[top5], full[top5] / full[top5].sum(), rtol=1e-5)
    assert Sampler(3, temperature=5.0, topk=1, seed=1)(np.array([1.0, 1.5, 1.2], dtype=np.float32)) == 1


def test_minp_drops_unlikely_tokens():
    logits = np.log(np.array([0.4, 0.3, 0.1, 0.02, 0.18])).astype(np.float32)
    for seed in range(1, 200):
        probs = logits.copy()
        token = Sampler(5, temperature=1.0, topp=0.0, minp=0.3, seed=seed)(probs)
        # threshold 0.3 * 0.4 = 0.12: tokens 2 (0.1) and 3 (0.02) are out
        assert token in (0, 1, 4)
        assert probs[2] == 0 and probs[3] == 0
        np.testing.assert_allclose(probs[[0, 1, 4]], np.array([0.4, 0.3, 0.18]) / 0.88, rtol=1e-5)


def test_repetition_penalty_ctrl_style():
    logits = np.array([5.0, 4.9, -1.0, 2.0], dtype=np.float32)
    sampler = Sampler(4, temperature=0.0, repetition_penalty=1.25)
    assert sampler(logits.copy()) == 0  # no history: no penalty
    penalized = logits.copy()
    history = np.array([0, 2, 0, 0], dtype=np.int32)  # token 0 three times: penalized once
    assert sampler(penalized, history) == 1
    np.testing.assert_array_equal(penalized, np.array([4.0, 4.9, -1.25, 2.0], dtype=np.float32))
    strong = Sampler(4, temperature=0.0, repetition_penalty=3.0)
    assert strong(logits.copy(), [0, 1]) == 3  # 5/3 and 4.9/3 fall below 2.0; a plain list works too


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(topp=1.5), "topp"),
        (dict(topp=-0.01), "topp"),
        (dict(topp=float("nan")), "topp"),
        (dict(topk=-1), "topk"),
        (dict(topk=2.5), "topk"),
        (dict(minp=1.0), "minp"),
        (dict(minp=-0.2), "minp"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_invalid_settings_raise(kwargs, flag):
    with pytest.raises(GenerationError) as e:
        Sampler(16, **kwargs)
    msg = str(e.value)
    assert msg.startswith(flag) and repr(next(iter(kwargs.values()))) in msg and "\n" not in msg


def test_wrong_logits_rejected():
    sampler = Sampler(4)
    with pytest.raises(GenerationError, match="float32"):
        sampler(np.zeros(4, dtype=np.float64))
    with pytest.raises(GenerationError, match=r"\(4,\)"):
        sampler(np.zeros(5, dtype=np.float32))


# ----------------------------------------------------------------------------- llama2.c parity
# A small float32 NumPy transcription of run.c's forward() for stories260K, teacher-forced on
# llama2.c's own output: at every step the sampler must pick the token llama2.c printed.


def _load_v0(path):
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.frombuffer(raw[:28], dtype="<i4")
    w = np.frombuffer(raw[28:], dtype="<f4")
    hs = dim // n_heads
    kv_dim = n_kv * hs
    shapes = [("emb", (abs(vocab), dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
              ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)), ("rope", (2, seq_len, hs // 2))]
    out, off = {}, 0
    for name, shape in shapes:
        size = math.prod(shape)
        out[name] = w[off : off + size].reshape(shape)
        off += size
    out["wcls"] = out["emb"] if vocab > 0 else w[off:].reshape(-vocab, dim)
    out.update(dim=int(dim), n_heads=int(n_heads), n_kv=int(n_kv), hs=int(hs), n_layers=int(n_layers), seq_len=int(seq_len))
    return out


class _RefModel:
    def __init__(self, w):
        self.w = w
        self.kc = np.zeros((w["n_layers"], w["seq_len"], w["n_kv"] * w["hs"]), np.float32)
        self.vc = np.zeros_like(self.kc)

    @staticmethod
    def rmsnorm(x, weight):
        ss = F32(np.dot(x, x)) / F32(x.shape[0]) + F32(1e-5)
        return weight * (F32(1.0) / np.sqrt(ss) * x)

    def rope(self, v, pos):
        hs = self.w["hs"]
        head_dim = (np.arange(0, v.shape[0], 2) % hs).astype(np.float32)
        freq = F32(1.0) / np.power(F32(10000.0), head_dim / F32(hs))
        val = F32(pos) * freq
        c, s = np.cos(val), np.sin(val)
        v0, v1 = v[0::2].copy(), v[1::2].copy()
        v[0::2] = v0 * c - v1 * s
        v[1::2] = v0 * s + v1 * c

    def forward(self, token, pos):
        w, hs = self.w, self.w["hs"]
        kv_mul = w["n_heads"] // w["n_kv"]
        x = w["emb"][token].copy()
        for l in range(w["n_layers"]):
            xb = self.rmsnorm(x, w["rms_att"][l])
            q, k, v = w["wq"][l] @ xb, w["wk"][l] @ xb, w["wv"][l] @ xb
            self.rope(q, pos)
            self.rope(k, pos)
            self.kc[l, pos], self.vc[l, pos] = k, v
            att_out = np.empty_like(q)
            for h in range(w["n_heads"]):
                kvh = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
                att = (self.kc[l, : pos + 1, kvh] @ q[h * hs : (h + 1) * hs]) / np.sqrt(F32(hs))
                att = np.exp(att - att.max())
                att /= att.sum()
                att_out[h * hs : (h + 1) * hs] = att @ self.vc[l, : pos + 1, kvh]
            x += w["wo"][l] @ att_out
            xb = self.rmsnorm(x, w["rms_ffn"][l])
            h1, h3 = w["w1"][l] @ xb, w["w3"][l] @ xb
            x += w["w2"][l] @ (h1 / (F32(1.0) + np.exp(-h1)) * h3)
        return w["wcls"] @ self.rmsnorm(x, w["rms_final"])


def test_sampler_reproduces_llama2c_generation():
    from babyllama.tokenizers.llama2c import Llama2cTokenizer as Tokenizer

    fixture = json.loads(shared_fixture("generate_stories260K.json").read_text())
    weights = _load_v0(shared_file(fixture["model"]))
    tok = Tokenizer.load(shared_file(fixture["tokenizer"]), weights["wcls"].shape[0])
    sampled = 0
    for case in fixture["cases"]:
        a = case["args"]
        prompt = tok.encode(a["prompt"] or "")
        sampler = Sampler(tok.vocab_size, temperature=a["temperature"], topp=a["topp"], seed=a["seed"])
        model = _RefModel(weights)
        token = prompt[0]
        for pos, want in enumerate(case["generated_ids"]):
            logits = model.forward(token, pos).astype(np.float32)
            if pos < len(prompt) - 1:
                got = prompt[pos + 1]  # forced prompt token: run.c does not sample (no coin drawn)
            else:
                got = sampler(logits)
                sampled += 1
            assert got == want, (a, pos)
            token = got
    assert sampled > 800
