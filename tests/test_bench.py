"""`babyllama bench --peer`: a llama2.c `run` binary timed next to ours (a stand-in binary here)."""

import json
import stat

import pytest

from babyllama.cli.bench import main
from babyllama.testing import placeholder_tokenizer
from babyllama.errors import BabyLlamaError
from babyllama.tokenizers.llama2c import Llama2cTokenizer as Tokenizer


def _fake_run(path, stderr_line):
    """A stand-in for llama2.c's run: records its arguments and OMP_NUM_THREADS, prints one line."""
    path.write_text(f'#!/bin/sh\necho "$@" "threads=$OMP_NUM_THREADS" >> "{path}.calls"\n'
                    f'echo "some story"\necho "{stderr_line}" >&2\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_peer_column_and_ratio(tiny_model, tmp_path, capsys):
    fake = _fake_run(tmp_path / "run", "achieved tok/s: 123.500000")
    assert main([str(tiny_model), "--no-ttft", "--serial", "--repeats", "2", "--steps", "8", "--peer", str(fake),
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["run_tok_s"] == 123.5
    assert row["vs_run"] == round(row["tok_s"] / 123.5, 2)
    calls = (tmp_path / "run.calls").read_text().splitlines()
    tok = tiny_model.parent / "tokenizer.bin"
    assert calls == [f"{tiny_model} -z {tok} -n 8 -s 42 -t 0 threads=1"] * 2  # once per repeat, greedy


def test_peer_without_its_speed_line_is_an_error(tiny_model, tmp_path):
    fake = _fake_run(tmp_path / "run", "Couldn't open file")
    with pytest.raises(BabyLlamaError, match="no 'achieved tok/s'"):
        main([str(tiny_model), "--no-ttft", "--repeats", "1", "--steps", "4", "--peer", str(fake)])


@pytest.mark.parametrize("vocab", [32000, 512])
def test_placeholder_tokenizer_has_the_vocab_size(tmp_path, vocab):
    placeholder_tokenizer(vocab).save(tmp_path / "t.bin")
    tok = Tokenizer.load(tmp_path / "t.bin", vocab)  # exactly vocab records (a wrong count is an error)
    assert tok.decode([1, 3 + ord("A"), vocab - 1]) == f"At{vocab - 1}"
