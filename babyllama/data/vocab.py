"""Vocabularies: sentencepiece BPE training with llama2.c's settings, and a .model's pieces as
llama2.c's tokenizer.bin holds them (the file layout itself is formats/llama2c.py's)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from ..errors import DataError, TokenizerError
from ..fileio import check_output, make_folder, write_bytes
from ..formats.llama2c import write_tokenizer_bin
from .corpus import iter_documents

N_SPECIAL = 3  # <unk>, <s>, </s> at ids 0, 1, 2
N_BYTE_PIECES = 256  # byte fallback: one piece per byte value, ids 3..258
MIN_VOCAB = N_SPECIAL + N_BYTE_PIECES + 1  # plus at least one character of the corpus

# llama2.c's train_vocab settings (tinystories.py), so vocabularies are interchangeable with its own.
LLAMA2C_SPM_SETTINGS = dict(
    model_type="bpe",
    character_coverage=1.0,  # every character of the corpus is a piece (rare ones too)
    split_digits=True,  # numbers are spelled digit by digit, like Llama 2
    allow_whitespace_only_pieces=True,
    byte_fallback=True,  # unknown characters become <0xNN> byte pieces instead of <unk>
    unk_surface=" \u2047 ",
    normalization_rule_name="identity",  # no NFKC: the text is the text
    add_dummy_prefix=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


def _import_sentencepiece():
    try:
        import sentencepiece as spm
    except ImportError:
        raise DataError("sentencepiece is not installed: pip install 'babyllama[train]'") from None
    return spm


def train_vocab(vocab_size: int, input, out_dir, split_on: str = "auto", text_field: str | None = None,
                max_documents: int | None = None, num_threads: int | None = None) -> tuple[Path, Path]:
    """Train a BPE vocabulary on a corpus; write out_dir/tok{N}.model and tok{N}.bin atomically.

    Sentences given to sentencepiece are the non-blank lines of each document (as llama2.c's
    tiny.txt has them). out_dir may exist or be created (one level); it is checked before the
    training starts. Returns (model_path, bin_path).
    """
    spm = _import_sentencepiece()
    check_output(out_dir, [input], folder=True)
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab size {vocab_size} is too small: byte fallback needs {N_BYTE_PIECES} byte pieces + "
            f"<unk>, <s>, </s> plus the corpus' characters; expected at least {MIN_VOCAB}"
        )
    counted = [0]

    def sentences():
        for i, doc in enumerate(iter_documents(input, split_on, text_field)):
            if max_documents is not None and i >= max_documents:
                return
            for line in doc.split("\n"):
                if line.strip():
                    counted[0] += 1
                    yield line

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **LLAMA2C_SPM_SETTINGS,
        )
    except RuntimeError as e:
        if counted[0] == 0:
            raise DataError(f"{input}: corpus holds no text to train a vocabulary on") from None
        raise DataError(_explain_spm_error(str(e), vocab_size)) from None
    out_dir = make_folder(out_dir, [input])
    model_path = write_bytes(out_dir / f"tok{vocab_size}.model", model.getvalue(), [input])
    bin_path = export_tokenizer(model_path, out_dir / f"tok{vocab_size}.bin", [input])
    return model_path, bin_path


def _explain_spm_error(msg: str, vocab_size: int) -> str:
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        need = int(m.group(2))
        return (f"vocab size {vocab_size} is too small for this corpus: its {need - N_SPECIAL - N_BYTE_PIECES} "
                f"distinct characters + {N_SPECIAL + N_BYTE_PIECES} byte/special pieces need at least {need}")
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return (f"vocab size {vocab_size} is too large for this corpus: sentencepiece can learn at most "
                f"{m.group(2)} pieces from it; use a smaller --vocab-size or more text")
    return f"sentencepiece training failed: {msg.strip().splitlines()[-1] if msg.strip() else msg}"


def load_sentencepiece(model_path):
    """Open a sentencepiece .model file, raising TokenizerError when it is missing or malformed."""
    spm = _import_sentencepiece()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TokenizerError(f"{model_path}: no such sentencepiece tokenizer (.model) file")
    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{model_path}: not a sentencepiece model ({first})") from None


def llama2c_pieces(model_path) -> tuple[list[bytes], list[float]]:
    """A sentencepiece model's (pieces, scores) as llama2.c's tokenizer.bin stores them.

    Scores are sentencepiece's; "\u2581" becomes a space; BOS/EOS are "\\n<s>\\n" and
    "\\n</s>\\n" as llama2.c's exporter writes them, so its tok512.bin is reproduced byte for byte.
    """
    sp = load_sentencepiece(model_path)
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if ids != (0, 1, 2):
        raise TokenizerError(
            f"{model_path}: expected <unk>, <s>, </s> at ids 0, 1, 2 (llama2.c's convention), found {ids}"
        )
    special = {1: "\n<s>\n", 2: "\n</s>\n"}
    pieces = [special.get(i, sp.id_to_piece(i).replace("\u2581", " ")).encode("utf-8") for i in range(sp.vocab_size())]
    return pieces, [sp.get_score(i) for i in range(sp.vocab_size())]


def export_tokenizer(model_path, out_bin, inputs=()) -> Path:
    """Write a sentencepiece model as tokenizer.bin, atomically; return the path. The output
    must not be the model or any of `inputs`."""
    pieces, scores = llama2c_pieces(model_path)
    return write_tokenizer_bin(out_bin, pieces, scores, inputs=[model_path, *inputs])
