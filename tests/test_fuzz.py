"""Every file reader under hypothesis: llama2.c .bin (v0-v3), tokenizer.bin, safetensors (+ its
config.json), GGUF and tokenizer.json, each fed valid small files with bytes overwritten, cut short,
header-sized integers planted (0, -1, 2**31, 2**63, ...) and JSON values replaced.

Each read must either succeed or raise one of babyllama's errors (a one-line message): no other
exception (a crash), no read that outlives its time limit (a hang), and no allocation larger than
what the file itself could justify (a size taken from an unchecked header field), measured with
tracemalloc. The example counts keep the whole file to a few seconds on 2 cores."""

import json
import os
import signal
import tracemalloc
from pathlib import Path

import pytest
from conftest import random_weights

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from babyllama.arch.llama import Weights  # noqa: E402
from babyllama.config import ModelConfig  # noqa: E402
from babyllama.errors import BabyLlamaError  # noqa: E402
from babyllama.formats.llama2c import load_checkpoint, write_checkpoint, write_quantized_checkpoint  # noqa: E402
from babyllama.testing import small_tokenizer  # noqa: E402

CFG = ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300, seq_len=8,
                  shared_classifier=False)
TIME_LIMIT_S = 3
# CI: 40 fixed examples per reader; BABYLLAMA_FUZZ_EXAMPLES=5000 for a long random search
EXAMPLES = int(os.environ.get("BABYLLAMA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 40, deadline=None, database=None, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"the read took more than {TIME_LIMIT_S} s")


def check_read(read, path: Path):
    """read(path) returns or raises a BabyLlamaError, in time, allocating at most what the file justifies."""
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    tracemalloc.start()
    try:
        read(path)
    except BabyLlamaError as e:
        assert "\n" not in str(e), str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    # decoding may widen (fp16 -> fp32, Q4_0 -> fp32 is 7x); nothing may exceed that by a header's say-so
    assert peak <= 16 * size + (8 << 20), f"peak allocation {peak} bytes for a {size}-byte file"


POSITION = st.one_of(st.integers(0, 320), st.integers(0, 1 << 24))
HEADER_INTS = st.sampled_from([0, 1, 2, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1])
MUTATION = st.one_of(
    st.tuples(st.just("bytes"), POSITION, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("cut"), POSITION, st.just(b"")),
    st.tuples(st.just("u32"), POSITION, HEADER_INTS),
    st.tuples(st.just("u64"), POSITION, HEADER_INTS),
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, pos, value in mutations:
        if not out:
            break
        pos %= len(out)
        if kind == "cut":
            del out[pos:]
        elif kind == "bytes":
            out[pos : pos + len(value)] = value
        else:
            n = 4 if kind == "u32" else 8
            out[pos : pos + n] = (value % (1 << (8 * n))).to_bytes(n, "little")
    return bytes(out)


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def mutate_json(obj, data):
    """obj with one value somewhere inside replaced by a drawn JSON value (or a key removed)."""
    if not isinstance(obj, (dict, list)) or not obj or data.draw(st.booleans()):
        return data.draw(JSON_VALUE)
    if isinstance(obj, dict):
        key = data.draw(st.sampled_from(sorted(obj)))
        if data.draw(st.integers(0, 4)) == 0:
            return {k: v for k, v in obj.items() if k != key}
        return {**obj, key: mutate_json(obj[key], data)}
    i = data.draw(st.integers(0, len(obj) - 1))
    return obj[:i] + [mutate_json(obj[i], data)] + obj[i + 1:]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Small valid files of every format."""
    d = tmp_path_factory.mktemp("seeds")
    w = Weights.from_dict(CFG, random_weights(CFG, seed=1))
    out = {}
    for v in (0, 1):
        write_checkpoint(d / f"v{v}.bin", CFG, w, version=v)
        out[f"v{v}"] = (d / f"v{v}.bin").read_bytes()
    for v in (2, 3):
        write_quantized_checkpoint(d / f"v{v}.bin", CFG, w, version=v)
        out[f"v{v}"] = (d / f"v{v}.bin").read_bytes()
    tok = small_tokenizer(300)
    tok.save(d / "tokenizer.bin")
    out["tokenizer.bin"] = (d / "tokenizer.bin").read_bytes()
    pytest.importorskip("safetensors")
    from babyllama.formats.hf import export_hf

    export_hf(d / "hf", CFG, w)
    out["safetensors"] = (d / "hf" / "model.safetensors").read_bytes()
    out["config.json"] = json.loads((d / "hf" / "config.json").read_text())
    pytest.importorskip("gguf")
    from babyllama.formats.gguf import export_gguf
    from babyllama.tokenizers.gguf import gguf_vocab

    export_gguf(d / "m.gguf", CFG, w, gguf_vocab(tok), "F16")
    out["gguf"] = (d / "m.gguf").read_bytes()
    pytest.importorskip("tokenizers")
    from hfmodels import byte_level_bpe

    byte_level_bpe(d / "bpe", vocab_size=300)
    out["tokenizer.json"] = json.loads((d / "bpe" / "tokenizer.json").read_text())
    return out


@pytest.mark.parametrize("version", ["v0", "v1", "v2", "v3"])
@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_bin_reader(tmp_path, seeds, version, mutations):
    (tmp_path / "m.bin").write_bytes(mutate(seeds[version], mutations))
    check_read(load_checkpoint, tmp_path / "m.bin")


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4), vocab=st.sampled_from([1, 259, 300, 2**31 - 1]))
def test_tokenizer_bin_reader(tmp_path, seeds, mutations, vocab):
    from babyllama.tokenizers.llama2c import Llama2cTokenizer

    (tmp_path / "tokenizer.bin").write_bytes(mutate(seeds["tokenizer.bin"], mutations))
    check_read(lambda p: Llama2cTokenizer.load(p, vocab), tmp_path / "tokenizer.bin")


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_safetensors_reader(tmp_path, seeds, mutations):
    from babyllama.formats.hf import load_hf_model

    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(seeds["config.json"]))
    (folder / "model.safetensors").write_bytes(mutate(seeds["safetensors"], mutations))
    check_read(load_hf_model, folder)


@FUZZ
@given(data=st.data())
def test_hf_config_reader(tmp_path, seeds, data):
    from babyllama.formats.hf import load_hf_model

    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(mutate_json(seeds["config.json"], data)))
    (folder / "model.safetensors").write_bytes(seeds["safetensors"])
    check_read(lambda f: load_hf_model(f, quantize=data.draw(st.sampled_from([None, 8, 4]))), folder)


def _read_gguf(path):
    from babyllama.formats import load_for_inference

    load_for_inference(path, note=lambda text: None)


@settings(FUZZ, max_examples=EXAMPLES or 80)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_gguf_reader(tmp_path, seeds, mutations):
    (tmp_path / "m.gguf").write_bytes(mutate(seeds["gguf"], mutations))
    check_read(_read_gguf, tmp_path / "m.gguf")


@FUZZ
@given(data=st.data())
def test_tokenizer_json_reader(tmp_path, seeds, data):
    from babyllama.tokenizers.hf import HFTokenizer

    spec = mutate_json(seeds["tokenizer.json"], data)
    text = json.dumps(spec, allow_nan=True)
    if data.draw(st.booleans()):
        text = mutate(text.encode(), data.draw(st.lists(MUTATION, min_size=1, max_size=2))).decode("utf-8", "replace")
    (tmp_path / "tokenizer.json").write_text(text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))

    def read(p):
        tok = HFTokenizer.from_file(p, 300)
        tok.decode(tok.encode("Héllo 🦙 <|eot_id|> 123"))

    check_read(read, tmp_path / "tokenizer.json")


def test_the_mutations_reach_the_readers(seeds, tmp_path):
    """The seeds are valid (the fuzz tests start from files that load) and planted header integers
    do produce errors, so the examples exercise the checks, not only the happy path."""
    from babyllama.formats.hf import load_hf_model
    from babyllama.tokenizers.hf import HFTokenizer

    (tmp_path / "v2.bin").write_bytes(seeds["v2"])
    assert load_checkpoint(tmp_path / "v2.bin").version == 2
    (tmp_path / "m.gguf").write_bytes(seeds["gguf"])
    _read_gguf(tmp_path / "m.gguf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(seeds["config.json"]))
    (tmp_path / "hf" / "model.safetensors").write_bytes(seeds["safetensors"])
    assert load_hf_model(tmp_path / "hf")[0] == CFG
    (tmp_path / "tokenizer.json").write_text(json.dumps(seeds["tokenizer.json"]))
    assert HFTokenizer.from_file(tmp_path / "tokenizer.json", 300).vocab_size == 300
    with pytest.raises(BabyLlamaError):  # the GGUF's metadata count (bytes 16-23) made absurd
        (tmp_path / "bad.gguf").write_bytes(mutate(seeds["gguf"], [("u64", 16, 2**40)]))
        _read_gguf(tmp_path / "bad.gguf")
