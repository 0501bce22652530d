"""The model babyllama ships (babyllama/assets): it loads, has the stories260K shape, and
`babyllama run` with no model argument tells a story offline."""

import pytest

import babyllama
from babyllama.cli import main
from babyllama.generate import DEFAULT_MODEL

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="bundled model missing (babyllama/assets/model.bin)")


def run_default(capsys, *argv):
    """`babyllama run` in-process with no model argument; returns (exit code, stdout, stderr)."""
    try:
        code = main(["run", *argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bundled_files_are_small_and_together():
    tok = DEFAULT_MODEL.parent / "tokenizer.bin"
    assert tok.is_file()
    assert DEFAULT_MODEL.stat().st_size < 4 * 1024 * 1024
    assert tok.stat().st_size < 64 * 1024
    assert (DEFAULT_MODEL.parent / "README.md").is_file()  # how they were made


def test_bundled_model_has_the_stories260k_shape():
    m = babyllama.load()
    c = m.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == (
        64, 172, 5, 8, 4, 512, 256)
    assert m.path == DEFAULT_MODEL


def test_run_without_a_model_tells_a_story(capsys):
    code, out, err = run_default(capsys, "-t", "0", "-n", "40")
    assert code == 0, err
    text = out.split("achieved tok/s")[0]
    assert len(text.strip()) > 40
    ascii_share = sum(ch.isascii() for ch in text) / len(text)
    assert ascii_share > 0.98
    words = text.split()
    assert len(words) >= 8
    # English-looking: mostly alphabetic words, and some of the commonest story words
    alpha = sum(w.strip(".,!?\"'").isalpha() for w in words) / len(words)
    assert alpha > 0.8
    common = {"the", "a", "and", "to", "was", "she", "he", "they", "her", "his", "it", "with", "day", "time"}
    assert {w.strip(".,!?\"'").lower() for w in words} & common


def test_greedy_is_deterministic(capsys):
    first = run_default(capsys, "-t", "0", "-n", "40", "-i", "Once upon a time")
    second = run_default(capsys, "-t", "0", "-n", "40", "-i", "Once upon a time")
    assert first[0] == second[0] == 0
    strip = lambda out: out.split("achieved tok/s")[0]  # the speed report differs run to run
    assert strip(first[1]) == strip(second[1])
    assert strip(first[1]).startswith("Once upon a time")
