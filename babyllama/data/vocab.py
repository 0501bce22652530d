"""Vocabularies: sentencepiece BPE training with llama2.c's settings, and .model -> tokenizer.bin."""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path


from .checkpoint import atomic_write
from .errors import DataError, TokenizerError
from .corpus import iter_documents

# ---------------------------------------------------------------------------------------------
# vocabulary training (sentencepiece) and tokenizer.bin export

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
    tiny.txt has them). Returns (model_path, bin_path).
    """
    spm = _import_sentencepiece()
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"tok{vocab_size}.model"
    atomic_write(model_path, lambda f: f.write(model.getvalue()))
    bin_path = export_tokenizer(model_path, out_dir / f"tok{vocab_size}.bin")
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
        raise TokenizerError(f"{model_path}: not a sentencepiece model ({str(e).strip()[:120]})") from None


def export_tokenizer(model_path, out_bin) -> Path:
    """Write a sentencepiece model as tokenizer.bin (DESIGN.md), atomically; return the path.

    Scores are sentencepiece's; "▁" becomes a space; BOS/EOS are written as "\\n<s>\\n" and
    "\\n</s>\\n" as llama2.c's exporter does, so its tok512.bin is reproduced byte for byte.
    """
    sp = load_sentencepiece(model_path)
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if ids != (0, 1, 2):
        raise TokenizerError(
            f"{model_path}: expected <unk>, <s>, </s> at ids 0, 1, 2 (llama2.c's convention), found {ids}"
        )
    pieces = []
    for i in range(sp.vocab_size()):
        if i == 1:
            text = "\n<s>\n"
        elif i == 2:
            text = "\n</s>\n"
        else:
            text = sp.id_to_piece(i).replace("\u2581", " ")
        pieces.append((sp.get_score(i), text.encode("utf-8")))
    max_len = max(len(b) for _, b in pieces)

    def write(f):
        f.write(struct.pack("<i", max_len))
        for score, b in pieces:
            f.write(struct.pack("<fi", score, len(b)))
            f.write(b)

    out_bin = Path(out_bin)
    atomic_write(out_bin, write)
    return out_bin


