"""The vocabulary a GGUF file embeds (tokenizer.* metadata), read into babyllama's tokenizers and
written from them (for `babyllama export --to gguf`).

  tokenizer.ggml.model "llama"  SentencePiece pieces, scores and token types: spm.py's tokenizer,
                                tokenizing as llama.cpp does (the space prefix after each special token)
  tokenizer.ggml.model "gpt2"   byte-level BPE tokens and merges: rebuilt as a tokenizer.json for the
                                `tokenizers` library (hf.py), with the pre-tokenizer named by
                                tokenizer.ggml.pre (PRE_TOKENIZERS: the ones of Llama 3, GPT-2, SmolLM)

Special ids: tokenizer.ggml.bos_token_id, and as end-of-reply ids eos, eot and eom (Llama 3's
<|eot_id|> is eot); tokenizer.chat_template is the chat template.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import TokenizerError
from .base import Tokenizer
from .chat import JinjaTemplate
from .spm import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, SentencePieceTokenizer

# llama.cpp's pre-tokenizer names -> the tokenizers library's pre_tokenizer that splits the same
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]},
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}
IGNORE_MERGES = {"llama-bpe"}  # Llama 3 looks a whole word up before merging (tokenizer.json's ignore_merges)
END_IDS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def _id(md: dict, key: str, n: int, where: str):
    v = md.get(key)
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 0xFFFFFFFF):  # llama.cpp's "none"
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n:
        raise TokenizerError(f"{where}: {key}: expected a token id below {n}, found {v!r}")
    return int(v)


def _array(md: dict, key: str, n: int, where: str, kind: str):
    v = md.get(key)
    if v is None:
        return None
    ok = isinstance(v, list) and all(isinstance(s, str) for s in v) if kind == "str" else \
        isinstance(v, np.ndarray) and (v.dtype.kind == kind)
    if not ok or (n >= 0 and len(v) != n):
        raise TokenizerError(f"{where}: {key}: expected {n if n >= 0 else 'a list of'} "
                             f"{'strings' if kind == 'str' else 'numbers'}, found {type(v).__name__} of {len(v) if hasattr(v, '__len__') else '?'}")
    return v


def gguf_tokenizer(md: dict, vocab_size: int, path=None) -> Tokenizer | None:
    """The tokenizer a GGUF's metadata describes (None when it has none)."""
    where = str(path or "GGUF")
    model = md.get("tokenizer.ggml.model")
    if model is None:
        return None
    tokens = _array(md, "tokenizer.ggml.tokens", -1, where, "str")
    if tokens is None:
        raise TokenizerError(f"{where}: tokenizer.ggml.tokens: expected the vocabulary, not found")
    n = len(tokens)
    if n > vocab_size:
        raise TokenizerError(f"{where}: the vocabulary has {n} tokens, the model's embedding only {vocab_size} rows")
    types = _array(md, "tokenizer.ggml.token_type", n, where, "i")
    types = [NORMAL] * n if types is None else [int(t) for t in types]
    bos = _id(md, "tokenizer.ggml.bos_token_id", n, where)
    eos = tuple(dict.fromkeys(i for i in (_id(md, k, n, where) for k in END_IDS) if i is not None))
    add_bos = md.get("tokenizer.ggml.add_bos_token", model == "llama")
    source = md.get("tokenizer.chat_template")
    template = None
    if isinstance(source, str) and source:
        template = JinjaTemplate(source, {"bos_token": tokens[bos] if bos is not None else None,
                                          "eos_token": tokens[eos[0]] if eos else None})
    if model == "llama":
        scores = _array(md, "tokenizer.ggml.scores", n, where, "f")
        scores = np.zeros(n, np.float32) if scores is None else scores
        tok = SentencePieceTokenizer(tokens, scores, types, vocab_size, bos, eos,
                                     _id(md, "tokenizer.ggml.unknown_token_id", n, where), bool(add_bos),
                                     prefix="after_special",
                                     add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
                                     chat_template=template, path=path)
    elif model == "gpt2":
        from .hf import HFTokenizer

        merges = _array(md, "tokenizer.ggml.merges", -1, where, "str") or []
        pre = md.get("tokenizer.ggml.pre", "gpt2")
        if pre == "default":
            pre = "gpt2"
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"{where}: tokenizer.ggml.pre: expected one of {', '.join(PRE_TOKENIZERS)} "
                                 f"(the pre-tokenizers babyllama knows), found {pre!r}")
        spec = bpe_json(tokens, merges, types, pre)
        settings = {"bos_token": None, "eos_token": None, "bos_ids": [bos] if bos is not None else [],
                    "eos_ids": list(eos), "add_bos": bool(add_bos), "chat_template": None}
        tok = HFTokenizer.from_json(json.dumps(spec), vocab_size, settings, path)
        tok.chat_template = template
    else:
        raise TokenizerError(f"{where}: tokenizer.ggml.model: expected 'llama' or 'gpt2', found {model!r}")
    tok.gguf_metadata = {k: v for k, v in md.items() if k.startswith("tokenizer.")}
    return tok


def bpe_json(tokens: list[str], merges: list[str], types: list[int], pre: str) -> dict:
    """A tokenizer.json for a GGUF gpt2 vocabulary: its tokens and merges, the named pre-tokenizer,
    control and user-defined tokens as added tokens (control ones special)."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": k == CONTROL} for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, USER_DEFINED)]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in IGNORE_MERGES, "vocab": vocab, "merges": list(merges)},
    }


# ---------------------------------------------------------------------------------------------
# writing


def gguf_vocab(tok: Tokenizer) -> dict:
    """tokenizer.* metadata for a GGUF, from any of babyllama's tokenizers."""
    meta = getattr(tok, "gguf_metadata", None)
    if meta is not None:
        return dict(meta)
    from .hf import HFTokenizer
    from .llama2c import Llama2cTokenizer

    if isinstance(tok, SentencePieceTokenizer):
        out = _spm(tok._texts, tok.scores.tolist(), tok._types, tok.add_space_prefix)
    elif isinstance(tok, Llama2cTokenizer):  # tokenizer.bin: sentencepiece pieces with spaces for "▁"
        texts = [p.decode("utf-8", "replace").replace(" ", "\u2581") for p in tok.vocab]
        types = [UNKNOWN if i == 0 else CONTROL if i in (1, 2) else BYTE if t.startswith("<0x") and len(t) == 6
                 else NORMAL for i, t in enumerate(texts)]
        out = _spm(texts, tok.scores.tolist(), types, True)
    elif isinstance(tok, HFTokenizer):
        out = _hf(tok)
    else:
        raise TokenizerError(f"cannot write a {type(tok).__name__} into a GGUF file")
    if tok.bos_id is not None:
        out["tokenizer.ggml.bos_token_id"] = int(tok.bos_id)
    for key, i in zip(END_IDS, tok.eos_ids):
        out[key] = int(i)
    out["tokenizer.ggml.add_bos_token"] = bool(getattr(tok, "add_bos", True))
    if isinstance(tok.chat_template, JinjaTemplate):
        out["tokenizer.chat_template"] = tok.chat_template.source
    if getattr(tok, "unk_id", None) is not None:
        out["tokenizer.ggml.unknown_token_id"] = int(tok.unk_id)
    return out


def _spm(texts, scores, types, prefix: bool) -> dict:
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": list(texts),
            "tokenizer.ggml.scores": [float(s) for s in scores], "tokenizer.ggml.token_type": [int(t) for t in types],
            "tokenizer.ggml.add_space_prefix": bool(prefix)}


def _hf(tok) -> dict:
    """A tokenizer.json's vocabulary as GGUF's gpt2 (byte-level) or llama (SentencePiece-style,
    scores from the merge order: the first merge scores highest) vocabulary."""
    spec = tok.spec
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{tok.path}: model type {model.get('type')!r}: GGUF export handles BPE tokenizers")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    n = len(tok.vocab)
    specials = tok._specials
    added = {t["id"] for t in spec.get("added_tokens", [])}
    if tok.byte_level:
        pre = next((name for name, p in PRE_TOKENIZERS.items() if _same_pre(p, spec.get("pre_tokenizer"))), None)
        if pre is None:
            raise TokenizerError(f"{tok.path}: pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:100]}: not one "
                                 f"llama.cpp names ({', '.join(PRE_TOKENIZERS)}); cannot write it into a GGUF")
        types = [CONTROL if i in specials else USER_DEFINED if i in added else NORMAL for i in range(n)]
        return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": list(tok.vocab),
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    scores = [0.0 if len(t) <= 1 or i in added else -float(rank.get(t, 1e9)) for i, t in enumerate(tok.vocab)]
    types = [CONTROL if i in specials and t != "<unk>" else UNKNOWN if t == "<unk>" else
             BYTE if len(t) == 6 and t.startswith("<0x") else NORMAL for i, t in enumerate(tok.vocab)]
    return _spm(tok.vocab, scores, types, tok._strip_first)


def _same_pre(a, b) -> bool:
    def norm(p):
        if isinstance(p, dict):
            return {k: norm(v) for k, v in p.items() if k != "trim_offsets"}
        if isinstance(p, list):
            return [norm(v) for v in p]
        return p
    return norm(a) == norm(b)
