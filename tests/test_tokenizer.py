"""tokenizer.bin loading, run.c-exact encoding, and run.c-style (UTF-8 assembling) decoding."""

import base64
import json
import random
import struct
from functools import lru_cache

import pytest
from conftest import shared_file, shared_fixture

from babyllama.errors import TokenizerError
from babyllama.tokenizers.llama2c import Llama2cTokenizer as Tokenizer


@lru_cache(maxsize=None)
def _load_shared(name: str, vocab_size: int) -> Tokenizer:
    return Tokenizer.load(shared_file(name), vocab_size)


def llama_tok() -> Tokenizer:
    return _load_shared("tokenizer.bin", 32000)


def tok512() -> Tokenizer:
    return _load_shared("tok512.bin", 512)


def write_tokenizer(path, pieces, scores=None, max_len=None, tail=b""):
    """A synthetic tokenizer.bin: header, one record per piece, then raw `tail` bytes."""
    scores = scores if scores is not None else [0.0] * len(pieces)
    max_len = max_len if max_len is not None else max(len(p) for p in pieces)
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max_len))
        for piece, score in zip(pieces, scores):
            f.write(struct.pack("<fi", score, len(piece)) + piece)
        f.write(tail)
    return path


def reference_encode(tok: Tokenizer, text: str) -> list[int]:
    """run.c's encode() transcribed naively: rescan every adjacent pair after every merge."""
    lookup = {p: i for i, p in enumerate(tok.vocab)}
    ids = [1]
    if text:
        ids.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        ids.extend([lookup[b]] if b in lookup else [x + 3 for x in b])
    while True:
        best_score, best_idx, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = lookup.get(tok.vocab[ids[i]] + tok.vocab[ids[i + 1]])
            if merged is not None and float(tok.scores[merged]) > best_score:
                best_score, best_idx, best_id = float(tok.scores[merged]), i, merged
        if best_idx == -1:
            return ids
        ids[best_idx : best_idx + 2] = [best_id]


# ----------------------------------------------------------------------------- encode


def _encode_cases():
    data = json.loads(shared_fixture("tokenizer_encode.json").read_text())
    for case in data["cases"]:
        yield case.get("tokenizer", data["tokenizer"]), case.get("vocab_size", data["vocab_size"]), case


def test_encode_matches_llama2c_fixtures():
    """Every string llama2.c encoded (both the Llama 2 32000 vocab and tok512) gives the same ids."""
    cases = list(_encode_cases())
    assert {name for name, _, _ in cases} == {"tokenizer.bin", "tok512.bin"}
    for name, vocab_size, case in cases:
        tok = _load_shared(name, vocab_size)
        assert tok.encode(case["text"]) == case["ids"], (name, case["text"])


@pytest.mark.parametrize("which", ["llama", "tok512"])
def test_encode_matches_naive_runc_merge_loop(which):
    """The heap-based merge picks the same pairs as run.c's rescan-everything loop."""
    tok = llama_tok() if which == "llama" else tok512()
    alphabet = list("abcdefghij  eeetthhh.,'\n\tXYZ") + ["é", "ï", "中", "文", "🦙", "🤠", "ß"]
    rng = random.Random(1234)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(60)]
    texts += ["aaaaaaaa", "        ", "the the the the", "\n\n\n"]  # many equal-score ties
    for text in texts:
        assert tok.encode(text) == reference_encode(tok, text), repr(text)


def test_encode_real_text_matches_naive_loop():
    tok = tok512()
    lines = [l for l in shared_file("tinystories_excerpt.txt").read_text().splitlines() if l.strip()][:10]
    for line in lines:
        assert tok.encode(line) == reference_encode(tok, line)


def test_encode_flags_and_empty_text():
    tok = tok512()
    assert tok.encode("") == [1]
    assert tok.encode("", bos=False) == []
    assert tok.encode("", bos=False, eos=True) == [2]
    ids = tok.encode("Once upon a time", bos=False, eos=True)
    assert ids == [403, 407, 261, 378, 2]


def test_encode_byte_fallback_with_small_vocab():
    """tok512 has no piece for the llama emoji: its four UTF-8 bytes become byte tokens (b + 3)."""
    tok = tok512()
    assert tok.encode("🦙")[-4:] == [b + 3 for b in "🦙".encode()]


def test_encode_bytes_groups_code_points_like_runc():
    """Raw bytes (maybe invalid UTF-8): a lead byte takes at most 3 continuation bytes."""
    tok = tok512()
    space = tok.vocab.index(b" ")
    assert tok.encode(b"\x80", bos=False) == [space, 0x80 + 3]
    # 5 continuation bytes after F0: the first group stops at 4 bytes, the 5th stands alone
    assert tok.encode(b"\xf0\x80\x80\x80\x80", bos=False) == [space, 0xF3, 0x83, 0x83, 0x83, 0x83]
    assert tok.encode("é".encode(), bos=False) == tok.encode("é", bos=False)


def test_encode_long_text_round_trips():
    # (speed is a benchmark's business: decode tok/s in `babyllama bench` includes the tokenizer)
    tok = llama_tok()
    text = shared_file("tinystories_excerpt.txt").read_text()[:4000]
    ids = tok.encode(text)
    assert len(ids) < len(text) / 2  # merges happened
    assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("which", ["llama", "tok512"])
def test_round_trip(which):
    tok = llama_tok() if which == "llama" else tok512()
    for text in ["Once upon a time", " leading space", "two  spaces", "new\nline\ttab",
                 "café naïve", "emoji 🦙🤠", "中文字符", "<s> is text", "<0x41>", "x"]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_piece_like_runc():
    tok = llama_tok()
    once = tok.encode("Once", bos=False)[-1]
    assert tok.vocab[once] == b" Once"
    assert tok.decode_piece(1, once) == b"Once"  # after BOS the leading space goes
    assert tok.decode_piece(5, once) == b" Once"
    assert tok.decode_piece(1, 0x0A + 3) == b"\n"  # "<0x0A>" is the byte 0x0A
    assert tok.decode_piece(1, 0xF0 + 3) == b"\xf0"
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode_piece(1, 32000)


def test_stream_assembles_emoji_from_byte_tokens():
    tok = llama_tok()
    ids = tok.encode("🦙!", bos=False)
    assert ids[1:5] == [b + 3 for b in "🦙".encode()]  # the Llama vocab has no llama emoji
    out = tok.stream()
    pieces = [out.feed(prev, cur) for prev, cur in zip([1] + ids, ids)]
    assert pieces[:5] == ["", "", "", "", "🦙"]  # nothing until the character is complete
    assert "".join(pieces) + out.flush() == "🦙!"


def test_stream_drops_control_bytes_like_safe_printf():
    tok = llama_tok()
    out = tok.stream()
    assert out.feed(5, 0x07 + 3) == ""  # BEL: not printable, not space -> run.c prints nothing
    assert out.feed(5, 0x00 + 3) == ""
    assert out.feed(5, 0x1B + 3) == ""
    assert out.feed(5, 0x0A + 3) == "\n"  # whitespace is printed
    assert out.feed(5, 0x09 + 3) == "\t"
    assert out.feed(5, ord("A") + 3) == "A"


def test_stream_invalid_utf8_becomes_replacement_char():
    tok = llama_tok()
    out = tok.stream()
    assert out.feed(5, 0xF0 + 3) == ""  # could still become a 4-byte character
    assert out.feed(5, ord("a") + 3) == "\ufffda"  # it did not
    assert out.feed(5, 0xE4 + 3) == ""
    assert out.flush() == "\ufffd"  # unfinished at the end
    assert out.feed(5, ord("b") + 3) == "b"  # flush reset the decoder


def test_stream_reproduces_llama2c_stdout():
    """Printing the fixtures' token ids like run.c's loop gives llama2.c's exact stdout."""
    tok = tok512()
    cases = json.loads(shared_fixture("generate_stories260K.json").read_text())["cases"]
    for case in cases:
        stdout = base64.b64decode(case["stdout_b64"]).decode("utf-8")
        out, text, token = tok.stream(), [], 1
        for nxt in case["generated_ids"]:
            if nxt == 1:
                break
            text.append(out.feed(token, nxt))
            token = nxt
        assert "".join(text) + out.flush() + "\n" == stdout
        ids = [i for i in case["generated_ids"] if i != 1]
        assert tok.decode(ids, prev_token=1) + "\n" == stdout


def test_stream_of_a_long_text_equals_decode():
    tok = llama_tok()
    text = shared_file("tinystories_excerpt.txt").read_text()[:20000]
    ids = tok.encode(text)
    out = tok.stream()
    streamed = "".join(out.feed(prev, cur) for prev, cur in zip(ids, ids[1:])) + out.flush()
    assert streamed == text


# ----------------------------------------------------------------------------- load errors

PIECES = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"b", b"ab", b" ab", b"c", b"abc"]


def test_load_synthetic_and_save_round_trip(tmp_path):
    path = write_tokenizer(tmp_path / "t.bin", PIECES, scores=[float(-i) for i in range(10)], max_len=6)
    tok = Tokenizer.load(path, 10)
    assert tok.vocab == PIECES and tok.vocab_size == 10 and tok.max_token_length == 6
    assert tok.scores.dtype.name == "float32" and tok.scores[9] == -9.0
    assert (tok.bos_id, tok.eos_ids, tok.stop_ids) == (1, (2,), (1,))
    tok.save(tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == path.read_bytes()


def test_load_fewer_tokens_than_model(tmp_path):
    path = write_tokenizer(tmp_path / "t.bin", PIECES)
    with pytest.raises(TokenizerError, match=r"expected 12 tokens, the file holds 10") as e:
        Tokenizer.load(path, 12)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_more_tokens_than_model(tmp_path):
    path = write_tokenizer(tmp_path / "t.bin", PIECES)
    with pytest.raises(TokenizerError, match=r"expected 8 tokens, the file holds 10"):
        Tokenizer.load(path, 8)


def test_load_real_vocab_with_wrong_size():
    with pytest.raises(TokenizerError, match=r"expected 512 tokens, the file holds 32000"):
        Tokenizer.load(shared_file("tokenizer.bin"), 512)
    with pytest.raises(TokenizerError, match=r"expected 32000 tokens, the file holds 512"):
        Tokenizer.load(shared_file("tok512.bin"), 32000)


def test_load_truncated_mid_record(tmp_path):
    full = write_tokenizer(tmp_path / "full.bin", PIECES).read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(full[:-2])  # the last piece "abc" loses two bytes
    with pytest.raises(TokenizerError, match=r"expected 10 tokens, the file holds 9 readable tokens, then token 9 is cut short"):
        Tokenizer.load(cut, 10)


def test_load_unparsable_tail_after_expected_tokens(tmp_path):
    path = write_tokenizer(tmp_path / "t.bin", PIECES, tail=b"xyz")
    with pytest.raises(TokenizerError, match=r"expected 10 tokens, the file holds at least 10 tokens, then token 10 is cut short"):
        Tokenizer.load(path, 10)


@pytest.mark.parametrize(
    "pieces, max_len, tail, vocab_size, message",
    [
        ([b"a"], 1, struct.pack("<fi", 0.0, -3), 2, "negative byte length"),
        ([b"a"], 1, struct.pack("<fi", 0.0, 4) + b"abcd", 2, "more than max_token_length 1"),
        ([b"a"], 2_000_000, struct.pack("<fi", 0.0, 1_000_000), 2, "needs 1000000 bytes, 0 left"),
        ([b"a"], 0, b"", 1, "expected a positive max_token_length, found 0"),
        ([b"a"], -7, b"", 1, "found -7"),
    ],
)
def test_load_malformed_records(tmp_path, pieces, max_len, tail, vocab_size, message):
    path = write_tokenizer(tmp_path / "t.bin", pieces, max_len=max_len, tail=tail)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.load(path, vocab_size)


def test_load_missing_directory_empty(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path / "nope.bin", 10)
    with pytest.raises(TokenizerError, match="is a directory"):
        Tokenizer.load(tmp_path, 10)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(TokenizerError, match="found 0 bytes"):
        Tokenizer.load(tmp_path / "empty.bin", 10)
    write_tokenizer(tmp_path / "t.bin", PIECES)
    with pytest.raises(TokenizerError, match="vocab_size must be a positive integer"):
        Tokenizer.load(tmp_path / "t.bin", 0)


def test_load_garbage_never_raises_anything_else(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "garbage.bin"
    for _ in range(300):
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))))
        try:
            Tokenizer.load(path, rng.randint(1, 5))
        except TokenizerError:
            pass


def test_encode_without_byte_tokens_raises(tmp_path):
    tok = Tokenizer.load(write_tokenizer(tmp_path / "t.bin", PIECES), 10)
    assert tok.encode("ab") == [1, 7]  # " " + "a" + "b" -> " ab"
    with pytest.raises(TokenizerError, match="byte fallback"):
        tok.encode("z")
