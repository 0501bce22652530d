"""babyllama.data and `babyllama data`: corpus reading, download, vocabulary training, pretokenized
shards, TokenWindows; outputs that are inputs or cannot be written are one-line errors."""

import hashlib
import os
import io
import json
import re
import struct
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import shared_file

from babyllama import data
from babyllama.cli import main as cli_main
from babyllama.errors import DataError, OutputError, TokenizerError

pytest.importorskip("sentencepiece")

# ---------------------------------------------------------------------------------------------
# corpora

TINY = "Once there was a cat.\n\nThe cat sat.\nA dog ran.\nThe end was near.\n\n\nIt came.\n"


def test_txt_tinystories_split(tmp_path):
    (tmp_path / "c.txt").write_text(TINY)
    assert list(data.iter_documents(tmp_path / "c.txt")) == [
        "Once there was a cat.\n\nThe cat sat.", "A dog ran.", "The end was near.\n\nIt came.",
    ]


@pytest.mark.parametrize("mode, expected", [
    ("line", ["Once there was a cat.", "The cat sat.", "A dog ran.", "The end was near.", "It came."]),
    ("blank-line", ["Once there was a cat.", "The cat sat.\nA dog ran.\nThe end was near.", "It came."]),
    ("none", [TINY.strip()]),
])
def test_txt_split_modes(tmp_path, mode, expected):
    (tmp_path / "c.txt").write_text(TINY.replace("\n", "\r\n"))  # Windows line ends read the same
    docs = list(data.iter_documents(tmp_path / "c.txt", split_on=mode))
    assert [d.replace("\r\n", "\n") for d in docs] == expected


def test_folder_jsonl_and_tinystories_json(tmp_path):
    (tmp_path / "b.txt").write_text("file b\nsecond line of b\n")
    (tmp_path / "a.txt").write_text("file a\n")
    (tmp_path / ".hidden.txt").write_text("skipped\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "json one", "id": 1}\n\n{"text": "  json two "}\n')
    (tmp_path / "sub" / "data00.json").write_text(json.dumps([{"story": "Lily ran.\n\nShe fell."}, {"story": ""}]))
    docs = list(data.iter_documents(tmp_path))  # folders: one .txt file = one document
    assert docs == ["file a", "file b\nsecond line of b", "json one", "json two", "Lily ran.\n\nShe fell."]
    assert len(list(data.iter_documents(tmp_path, split_on="line"))) == 6

    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    assert list(data.iter_documents(tmp_path / "d.jsonl", text_field="body")) == ["x"]
    with pytest.raises(DataError, match=r"d.jsonl:1: expected field 'text' or 'story', found keys \['body'\]"):
        list(data.iter_documents(tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match="no such corpus"):
        data.iter_documents(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no corpus files"):
        data.iter_documents(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# vocabulary: trained once for the module on a slice of real TinyStories text

VOCAB = 384


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    text = shared_file("tinystories_excerpt.txt").read_text(encoding="utf-8")
    docs = list(data.split_lines(io.StringIO(text[:120_000]), "tinystories"))[:-1]  # drop a cut-off story
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path, docs


@pytest.fixture(scope="module")
def vocab(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    return data.train_vocab(VOCAB, corpus[0], out, num_threads=1)


def read_tokenizer_bin(path, n):
    buf = path.read_bytes()
    (max_len,) = struct.unpack_from("<i", buf)
    off, pieces = 4, []
    for _ in range(n):
        score, length = struct.unpack_from("<fi", buf, off)
        pieces.append((score, buf[off + 8 : off + 8 + length]))
        off += 8 + length
    assert off == len(buf)
    return max_len, pieces


def test_train_vocab_writes_model_and_tokenizer_bin(vocab, corpus):
    model, bin_ = vocab
    assert (model.name, bin_.name) == (f"tok{VOCAB}.model", f"tok{VOCAB}.bin")
    sp = data.load_sentencepiece(model)
    assert sp.vocab_size() == VOCAB
    max_len, pieces = read_tokenizer_bin(bin_, VOCAB)
    assert max_len == max(len(b) for _, b in pieces)
    assert [b for _, b in pieces[:4]] == [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"<0x00>"]
    assert pieces[258][1] == b"<0xFF>"
    assert all(sp.get_score(i) == s for i, (s, _) in enumerate(pieces))
    # a learnt piece with the word-boundary marker is stored with a space
    assert any(b.startswith(b" ") and len(b) > 2 for _, b in pieces[259:])
    # byte fallback: a character the corpus never had becomes its UTF-8 bytes, not <unk>
    assert "<0xE2>" in [sp.id_to_piece(t) for t in sp.encode("\u2603")]
    # babyllama's own tokenizer.bin reader loads it and agrees with sentencepiece
    from babyllama.tokenizers import Llama2cTokenizer

    tok = Llama2cTokenizer.load(bin_, VOCAB)
    text = "Once upon a time, a little dog found a big red ball in the park."
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_export_tokenizer_reproduces_llama2c(tmp_path):
    out = data.export_tokenizer(shared_file("tok512.model"), tmp_path / "tok512.bin")
    assert out.read_bytes() == shared_file("tok512.bin").read_bytes()


def test_vocab_size_errors(tmp_path, corpus):
    with pytest.raises(DataError, match="vocab size 200 is too small: .*expected at least 260"):
        data.train_vocab(200, corpus[0], tmp_path)
    with pytest.raises(DataError, match=r"vocab size 300 is too small for this corpus: its \d+ distinct characters"):
        data.train_vocab(300, corpus[0], tmp_path, num_threads=1)
    small = tmp_path / "small.txt"
    small.write_text(corpus[1][0] + "\n")
    with pytest.raises(DataError, match=r"vocab size 2000 is too large for this corpus: .* at most \d+ pieces"):
        data.train_vocab(2000, small, tmp_path, num_threads=1)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="holds no text"):
        data.train_vocab(300, tmp_path / "blank.txt", tmp_path)
    assert not list(tmp_path.glob("tok*"))


# ---------------------------------------------------------------------------------------------
# pretokenize


@pytest.fixture(scope="module")
def shards(vocab, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    meta = data.pretokenize(vocab[0], corpus[0], out, val_fraction=0.05, workers=1, shard_tokens=20_000)
    return out, meta


def test_pretokenize_layout_bos_and_val_split(shards, vocab, corpus):
    out, meta = shards
    docs = corpus[1]
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16"
    assert len(meta["train_shards"]) > 1  # 20k-token shards
    assert json.loads((out / "meta.json").read_text()) == meta
    train = np.concatenate([np.fromfile(out / f, dtype="<u2") for f in meta["train_shards"]])
    val = np.fromfile(out / "val.bin", dtype="<u2")
    assert (len(train), len(val)) == (meta["n_train_tokens"], meta["n_val_tokens"])

    val_idx = [i for i in range(len(docs)) if data.is_val_document(i, 0.05)]
    assert 0 < len(val_idx) < len(docs) / 10 and val_idx[0] == 0
    sp = data.load_sentencepiece(vocab[0])

    def split_at_bos(tokens):
        assert tokens[0] == 1  # every document starts with BOS
        cuts = np.flatnonzero(tokens == 1)
        return [sp.decode(part[1:].tolist()) for part in np.split(tokens, cuts[1:])]

    # sentencepiece (llama2.c's settings keep remove_extra_whitespaces) collapses runs of spaces
    docs = [re.sub(" {2,}", " ", d) for d in docs]
    assert split_at_bos(val) == [docs[i] for i in val_idx]
    assert split_at_bos(train) == [d for i, d in enumerate(docs) if i not in set(val_idx)]
    assert meta["n_val_documents"] == len(val_idx)


def test_pretokenize_two_workers_same_bytes(shards, vocab, corpus, tmp_path):
    out, meta = shards
    meta2 = data.pretokenize(vocab[0], corpus[0], tmp_path, val_fraction=0.05, workers=2, shard_tokens=20_000)
    assert meta2 == meta
    for name in meta["train_shards"] + ["val.bin"]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_pretokenize_errors(tmp_path, vocab):
    (tmp_path / "empty.txt").write_text(" \n\n \n")
    with pytest.raises(DataError, match="corpus holds no documents"):
        data.pretokenize(vocab[0], tmp_path / "empty.txt", tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "meta.json").exists()
    (tmp_path / "one.txt").write_text("A single story.\n")
    with pytest.raises(DataError, match="no training tokens: all 1 documents went to validation"):
        data.pretokenize(vocab[0], tmp_path / "one.txt", tmp_path / "out", val_fraction=0.5, workers=1)
    with pytest.raises(TokenizerError, match="no such sentencepiece tokenizer"):
        data.pretokenize(tmp_path / "tok.model", tmp_path / "one.txt", tmp_path / "out")
    with pytest.raises(DataError, match="does not fit uint16"):
        data.token_dtype(70_000, "uint16")
    assert data.token_dtype(65_536, "auto") == np.uint16 and data.token_dtype(65_537) == np.uint32


def test_cli_pretokenize(tmp_path, vocab, corpus, capsys):
    assert cli_main(["data", "pretokenize", "--tokenizer", str(vocab[0]), "--input", str(corpus[0]),
                     "--out", str(tmp_path), "--workers", "1", "--dtype", "uint32"]) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and (tmp_path / "val.bin").stat().st_size == 4 * meta["n_val_tokens"]
    capsys.readouterr()
    assert cli_main(["data", "pretokenize", "--tokenizer", str(tmp_path / "no.model"), "--input", str(corpus[0]),
                     "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("babyllama data: error: ") and err.count("\n") == 1


def test_every_data_flag_has_a_help_text():
    import argparse

    from babyllama.cli.data import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"babyllama data {name} {action.dest}"


def test_outputs_that_are_inputs_are_refused(tmp_path, vocab, corpus):
    model, bin_ = vocab
    before = model.read_bytes()
    (tmp_path / "link.model").symlink_to(model)
    os.link(model, tmp_path / "hard.model")
    for out in (model, tmp_path / "link.model", tmp_path / "hard.model"):
        with pytest.raises(OutputError, match="the output is the input"):
            data.export_tokenizer(model, out)
    assert model.read_bytes() == before
    # a corpus folder as the output folder: neither shards nor a vocabulary land among the texts
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(corpus[1][0] + "\n")
    with pytest.raises(OutputError, match="the output is the input"):
        data.pretokenize(model, folder, folder, workers=1)
    with pytest.raises(OutputError, match="the output is the input"):
        data.train_vocab(VOCAB, folder, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]


def test_unwritable_outputs_are_one_line_errors(tmp_path, vocab, corpus, capsys):
    model, _ = vocab
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    cases = [  # (argv, the path the message must name)
        (["export-tokenizer", str(model), str(tmp_path / "missing" / "t.bin")], tmp_path / "missing"),
        (["export-tokenizer", str(model), str(tmp_path)], tmp_path),
        (["pretokenize", "--tokenizer", str(model), "--input", str(corpus[0]), "--out", str(tmp_path / "a" / "b"),
          "--workers", "1"], tmp_path / "a"),
    ]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        cases.append((["export-tokenizer", str(model), str(tmp_path / "ro" / "t.bin")], tmp_path / "ro"))
    for argv, path in cases:
        assert cli_main(["data", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"babyllama data: error: {path}") and err.count("\n") == 1, err
    assert not list(tmp_path.rglob(".*tmp*"))


# ---------------------------------------------------------------------------------------------
# TokenWindows


def test_windows_are_deterministic_and_shifted(shards):
    pytest.importorskip("torch")
    out, meta = shards
    a = data.TokenWindows(out, "train", seq_len=32, batch_size=8, seed=3)
    b = data.TokenWindows(out, "train", seq_len=32, batch_size=8, seed=3)
    x, y = a.batch(5)
    assert a.vocab_size == VOCAB
    assert x.shape == y.shape == (8, 32) and str(x.dtype) == "torch.int64"
    assert (x[:, 1:] == y[:, :-1]).all()
    x2, y2 = b.batch(5)
    assert (x == x2).all() and (y == y2).all()
    assert not (a.batch(6)[0] == x).all()
    assert not (data.TokenWindows(out, "train", 32, 8, seed=4).batch(5)[0] == x).all()
    # every row is a contiguous slice of the training stream
    stream = np.concatenate([np.fromfile(out / f, dtype="<u2") for f in meta["train_shards"]])
    for row in x.numpy():
        assert any(np.array_equal(stream[s : s + 32], row) for s in np.flatnonzero(stream == row[0]))


def test_ranks_slice_the_global_batch(shards):
    pytest.importorskip("torch")
    out, _ = shards
    whole = data.TokenWindows(out, "train", 16, 6, seed=1)
    parts = [data.TokenWindows(out, "train", 16, 6, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in (0, 9):
        x, y = whole.batch(step)
        xs, ys = zip(*(p.batch(step) for p in parts))
        assert xs[0].shape == (3, 16)
        assert (np.concatenate(xs) == x.numpy()).all() and (np.concatenate(ys) == y.numpy()).all()


def test_window_errors(shards, tmp_path):
    out, meta = shards
    with pytest.raises(DataError, match=f"corpus smaller than one window: {meta['n_val_tokens']} tokens, need seq_len\\+1 = 5001"):
        data.TokenWindows(out, "val", seq_len=5000, batch_size=2, seed=0)
    with pytest.raises(DataError, match="run `babyllama data pretokenize` first"):
        data.TokenWindows(tmp_path, "train", 8, 2, 0)
    with pytest.raises(DataError, match="batch_size 5 is not divisible by world_size 2"):
        data.TokenWindows(out, "train", 8, 5, 0, rank=0, world_size=2)


# ---------------------------------------------------------------------------------------------
# download, against a local HTTP server


class RangeHandler(SimpleHTTPRequestHandler):
    """http.server's file handler plus single-range requests (it has none of its own)."""

    ranges: list = []
    honour_range = True

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        if not (rng and self.honour_range):
            return super().send_head()
        body = open(self.translate_path(self.path), "rb").read()
        start = int(rng.removeprefix("bytes=").split("-")[0])
        if start >= len(body):
            self.send_error(416)
            return None
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        return io.BytesIO(body[start:])


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    stories = [{"story": f"Story number {i}.\n\nThe end."} for i in range(50)]
    payload = json.dumps(stories).encode()
    with tarfile.open(root / "Stories_all.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("data00.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    RangeHandler.ranges, RangeHandler.honour_range = [], True
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/Stories_all.tar.gz", root / "Stories_all.tar.gz"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_checks_and_unpacks(server, tmp_path):
    url, archive = server
    blob = archive.read_bytes()
    out = tmp_path / "dl"
    out.mkdir()
    (out / "Stories_all.tar.gz.part").write_bytes(blob[:100])  # an interrupted earlier download
    sha = hashlib.sha256(blob).hexdigest()
    folder = data.download(url, out, sha256=sha)
    assert RangeHandler.ranges == ["bytes=100-"]
    assert (out / "Stories_all.tar.gz").read_bytes() == blob
    assert folder == out / "Stories_all" and not (out / "Stories_all.tar.gz.part").exists()
    docs = list(data.iter_documents(folder))
    assert len(docs) == 50 and docs[7] == "Story number 7.\n\nThe end."
    # a second call finds everything in place and fetches nothing
    assert data.download(url, out, sha256=sha) == folder and len(RangeHandler.ranges) == 1


def test_download_restarts_when_range_is_ignored(server, tmp_path):
    url, archive = server
    RangeHandler.honour_range = False
    (tmp_path / "Stories_all.tar.gz.part").write_bytes(b"garbage that must not stay in front")
    assert cli_main(["data", "download", "--url", url, "--out", str(tmp_path), "--no-unpack"]) == 0
    assert (tmp_path / "Stories_all.tar.gz").read_bytes() == archive.read_bytes()


def test_download_sha256_mismatch(server, tmp_path, capsys):
    url, archive = server
    tmp_path = tmp_path / "dl"
    with pytest.raises(DataError, match=f"sha256 mismatch: expected {'0' * 64}, found {hashlib.sha256(archive.read_bytes()).hexdigest()}"):
        data.download(url, tmp_path, sha256="0" * 64)
    assert not list(tmp_path.iterdir())  # neither the file nor its .part is kept
    assert cli_main(["data", "download", "--url", url.replace("Stories_all", "nothing"), "--out", str(tmp_path)]) == 1
    assert "HTTP 404" in capsys.readouterr().err
