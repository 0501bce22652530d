"""fileio: outputs that must not be written (special files, the input itself), inputs that must not
be read (endless streams); and the CLI's one-line reports of them."""

import os
import subprocess
import sys

import pytest

from babyllama.errors import CheckpointError, OutputError, TokenizerError
from babyllama.fileio import atomic_write, check_output, map_readonly


def test_a_fifo_is_never_replaced(tmp_path):
    """Renaming a temporary file over a device or FIFO replaces the node (as root, /dev/full became
    a regular file): refused, and the node stays."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is not a regular file .* refusing to replace it"):
        atomic_write(fifo, lambda f: f.write(b"x"))
    assert fifo.is_fifo() and not list(tmp_path.glob(".*tmp*"))


def test_the_input_by_another_name_is_refused(tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(b"model")
    (tmp_path / "link").symlink_to(src)
    os.link(src, tmp_path / "hard")
    for other in (src, tmp_path / "link", tmp_path / "hard"):
        with pytest.raises(OutputError, match="the output is the input"):
            check_output(other, inputs=[src])
    assert src.read_bytes() == b"model"


def test_endless_streams_are_refused_before_reading(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # open() would block forever, /dev/zero would fill memory
    for path in (fifo, "/dev/zero"):
        with pytest.raises(CheckpointError, match="is not a regular file"):
            map_readonly(path, CheckpointError)
    from babyllama.formats.llama2c import read_tokenizer_bin

    with pytest.raises(TokenizerError, match="is not a regular file"):
        read_tokenizer_bin("/dev/zero", 300)


def test_run_with_dev_zero_tokenizer_is_one_line_and_quick(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "babyllama", "run", str(tiny_model), "-z", "/dev/zero"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "babyllama run: error: /dev/zero: is not a regular file (a device, FIFO or socket), expected a tokenizer file"]


def test_quantize_onto_a_fifo_is_refused(tmp_path, tiny_model):
    fifo = tmp_path / "out.bin"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "babyllama", "quantize", str(tiny_model), str(fifo)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "refusing to replace it" in proc.stderr and "Traceback" not in proc.stderr
    assert fifo.is_fifo()


def test_a_missing_extra_names_the_command_that_installs_it(capsys, monkeypatch):
    import importlib

    from babyllama import cli

    real = importlib.import_module

    def no_torch(name, *args):
        if name == "babyllama.cli.train":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_torch)
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'babyllama[train]'" in err and "from a source checkout: pip install -e '.[train]'" in err
