"""The model babyllama ships (babyllama/assets): it loads, has the stories260K shape, and
`babyllama run` with no model argument tells a story offline."""

import pytest

import babyllama
from babyllama.cli import main
from babyllama.api import DEFAULT_MODEL

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


def test_compiled_code_is_cached_outside_the_package(tmp_path):
    """The first run's machine code goes to the per-user cache, never into the installed package
    (a package folder written at run time shadowed an editable reinstall: `babyllama` broke)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    package = Path(babyllama.__file__).resolve().parent
    before = set(package.rglob("*.nbi")) | set(package.rglob("*.nbc"))
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "BABYLLAMA_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "babyllama", "run", "-n", "8", "-t", "0"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert list((tmp_path / "babyllama").rglob("*.nbi")), "no compiled code cached in $XDG_CACHE_HOME/babyllama"
    assert set(package.rglob("*.nbi")) | set(package.rglob("*.nbc")) == before
