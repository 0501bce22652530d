"""Hugging Face tokenizers (tokenizer.json) through the `tokenizers` library, with the model
folder's special tokens and chat template.

Encoding is the library's (byte-level BPE as in Llama 3 and SmolLM; SentencePiece-style BPE with
byte fallback as in Llama 2 and TinyLlama); special tokens written in the text ("<|eot_id|>")
become their ids, as in transformers. BOS is added when the folder's tokenizer adds it
(tokenizer_config.json's add_bos_token, else tokenizer.json's post-processor).

Decoding is token by token from a table of every token's exact bytes, built once from the
tokenizer's decoder: byte-level pieces through GPT-2's byte-to-unicode map, SentencePiece pieces
with "▁" as a space and "<0xNN>" as the byte NN; special tokens print nothing (transformers'
skip_special_tokens). So a streamed character split over several tokens appears whole, and
decode equals AutoTokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=
False). transformers' clean-up (" ." -> ".", " 's" -> "'s") is never applied: it changes text.

The folder settings (`folder_settings`) are shared with spm.py (a folder with tokenizer.model
only): bos/eos tokens from tokenizer_config.json, EOS ids from config.json and
generation_config.json (Llama 3 lists several, <|eot_id|> among them), the chat template from
chat_template.jinja, chat_template.json or tokenizer_config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import TokenizerError
from .base import Tokenizer
from .chat import JinjaTemplate

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: the character that stands for each byte -> the byte
    (printable latin-1 bytes stand for themselves, the others are shifted to U+0100...)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _library():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("tokenizer.json needs the tokenizers library: pip install 'babyllama[hf]'") from None
    return tokenizers


def _json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path}: no such file")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def folder_settings(folder) -> dict:
    """What a model folder says about its tokenizer: bos_token, eos_token, unk_token, pad_token
    (texts), add_bos (None when unsaid), bos_id / eos_ids from config.json and
    generation_config.json, and the chat template source (or None)."""
    folder = Path(folder)
    tc = _json(folder / "tokenizer_config.json")
    tokens = _json(folder / "special_tokens_map.json")
    tokens.update({k: v for k, v in tc.items() if k.endswith("_token")})
    model, generation = _json(folder / "config.json"), _json(folder / "generation_config.json")
    template = None
    if (folder / "chat_template.jinja").is_file():
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{folder / 'chat_template.jinja'}: cannot read it ({e})") from None
    else:
        template = _json(folder / "chat_template.json").get("chat_template", tc.get("chat_template"))
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{folder}: chat_template: expected a string, found {type(template).__name__}")
    add_bos = tc.get("add_bos_token")
    return {
        **{name: _token_content(tokens.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "add_bos": add_bos if isinstance(add_bos, bool) else None,
        "bos_ids": _ids(model.get("bos_token_id")) + _ids(generation.get("bos_token_id")),
        "eos_ids": _ids(generation.get("eos_token_id")) + _ids(model.get("eos_token_id")),
        "chat_template": template,
    }


def special_ids(settings: dict, token_to_id, vocab_size: int) -> tuple[int | None, tuple[int, ...]]:
    """(bos_id, eos_ids) from folder_settings: the named tokens first, then the config's ids."""
    bos = [token_to_id(settings["bos_token"])] if settings.get("bos_token") else []
    eos = [token_to_id(settings["eos_token"])] if settings.get("eos_token") else []
    bos = [i for i in bos + settings.get("bos_ids", []) if i is not None and 0 <= i < vocab_size]
    eos = [i for i in eos + settings.get("eos_ids", []) if i is not None and 0 <= i < vocab_size]
    return (bos[0] if bos else None), tuple(dict.fromkeys(eos))


def template_of(settings: dict) -> JinjaTemplate | None:
    source = settings.get("chat_template")
    if not source:
        return None
    special = {k: settings.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return JinjaTemplate(source, special)


class _Decoder:
    """A tokenizer.json decoder as per-token rules: byte-level, or text with replacements, byte
    fallback and a stripped first space (the SentencePiece decoders)."""

    def __init__(self, spec, where):
        self.byte_level, self.byte_fallback, self.strip_first = False, False, False
        self.replace: list[tuple[str, str]] = []
        self._read(spec, where)

    def _read(self, spec, where):
        if spec is None:
            return
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "Sequence":
            for d in spec.get("decoders") or []:
                self._read(d, where)
        elif kind == "ByteLevel":
            self.byte_level = True
        elif kind == "ByteFallback":
            self.byte_fallback = True
        elif kind == "Fuse":
            pass
        elif kind == "Replace" and isinstance(spec.get("pattern"), dict) and "String" in spec["pattern"]:
            self.replace.append((spec["pattern"]["String"], spec.get("content", "")))
        elif kind == "Strip" and spec.get("content") == " " and spec.get("stop", 0) == 0:
            self.strip_first = spec.get("start", 0) >= 1
        elif kind == "Metaspace":
            self.replace.append((spec.get("replacement", "\u2581"), " "))
            scheme = spec.get("prepend_scheme", "always" if spec.get("add_prefix_space", True) else "never")
            self.strip_first = scheme != "never"
        else:
            raise TokenizerError(f"{where}: decoder {json.dumps(spec)[:80]}: expected the byte-level or "
                                 "SentencePiece-style decoders of Llama-family tokenizers")

    def piece_bytes(self, piece: str, bytes_of: dict[str, int]) -> bytes:
        if self.byte_level:  # as tokenizers' ByteLevel decoder: a piece outside the alphabet is its UTF-8
            if all(c in bytes_of for c in piece):
                return bytes(bytes_of[c] for c in piece)
            return piece.encode("utf-8")
        if self.byte_fallback:
            m = _BYTE_TOKEN.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
        for a, b in self.replace:
            piece = piece.replace(a, b)
        return piece.encode("utf-8")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` behind babyllama's interface, sized to the model's vocabulary.

    Attributes: vocab (token strings, for comparing vocabularies), bos_id, eos_ids (end a chat
    reply), stop_ids (end plain generation: the EOS ids), add_bos, chat_template, path.
    """

    def __init__(self, tk, spec: dict, vocab_size: int, bos_id: int | None, eos_ids, add_bos: bool | None = None,
                 chat_template=None, path=None):
        n = tk.get_vocab_size(with_added_tokens=True)
        where = path or "tokenizer.json"
        if n > vocab_size:
            raise TokenizerError(f"{where}: the tokenizer has {n} tokens, the model's embedding only {vocab_size} rows")
        self._tk, self.vocab_size, self.path = tk, int(vocab_size), path
        self.bos_id, self.eos_ids = bos_id, tuple(eos_ids)
        self.stop_ids = self.eos_ids
        if add_bos is None:  # the post-processor decides, as in the tokenizers library
            add_bos = bos_id is not None and tk.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        decoder = _Decoder(spec.get("decoder"), where)
        self.spec, self.byte_level, self._strip_first = spec, decoder.byte_level, decoder.strip_first
        specials = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self._specials = specials
        bytes_of = byte_decoder()
        self.vocab = [tk.id_to_token(i) or "" for i in range(n)] + [""] * (vocab_size - n)
        self._bytes = [b"" if i in specials else decoder.piece_bytes(p, bytes_of) for i, p in enumerate(self.vocab)]

    @classmethod
    def from_file(cls, path, vocab_size: int, settings: dict | None = None) -> "HFTokenizer":
        """tokenizer.json at `path`, with `settings` (folder_settings; default: its folder's)."""
        path = Path(path)
        text = _read_text(path)
        return cls.from_json(text, vocab_size, folder_settings(path.parent) if settings is None else settings, path)

    @classmethod
    def from_json(cls, text: str, vocab_size: int, settings: dict, path=None) -> "HFTokenizer":
        where = path or "tokenizer.json"
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{where}: not JSON ({e})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise TokenizerError(f"{where}: expected a tokenizer.json object with a 'model', found {type(spec).__name__}")
        try:
            tk = _library().Tokenizer.from_str(text)
            bos, eos = special_ids(settings, tk.token_to_id, vocab_size)
            return cls(tk, spec, vocab_size, bos, eos, settings.get("add_bos"), template_of(settings), path)
        except TokenizerError:
            raise
        except BaseException as e:  # the library's Exception, or a PanicException on input it did not expect
            _reraise_interrupt(e)
            raise TokenizerError(f"{where}: the tokenizers library cannot load it ({str(e)[:200]})") from None

    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text` as AutoTokenizer.encode gives them: BOS first when `bos` and the tokenizer
        adds one, special tokens in the text as their ids. Text must be valid UTF-8."""
        try:
            text = text.decode("utf-8") if isinstance(text, bytes) else (text.encode("utf-8"), text)[1]
        except UnicodeError:
            raise TokenizerError("this tokenizer (tokenizer.json) encodes UTF-8 text only; the text is not valid UTF-8") \
                from None
        try:
            ids = self._tk.encode(text, add_special_tokens=False).ids
        except BaseException as e:  # the library panics (pyo3 PanicException) on some broken tokenizer.json
            _reraise_interrupt(e)
            raise TokenizerError(f"{self.path or 'tokenizer.json'}: the tokenizers library failed to encode the text "
                                 f"({str(e)[:200]})") from None
        if bos and self.add_bos:
            ids = [self.bos_id] + ids
        if eos and self.eos_ids:
            ids.append(self.eos_ids[0])
        return ids

    def token_bytes(self, prev_token: int, token: int) -> bytes:
        piece = self._bytes[token]
        if self._strip_first and piece[:1] == b" " and (prev_token < 0 or prev_token in self._specials):
            return piece[1:]  # the SentencePiece decoder drops the first token's space (its dummy prefix)
        return piece

    def token_text(self, token: int) -> str:
        return self.vocab[token] if 0 <= token < self.vocab_size else ""


def _reraise_interrupt(e: BaseException) -> None:
    if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
        raise e


def _read_text(path: Path) -> str:
    from ..fileio import regular_file_size

    regular_file_size(path, TokenizerError, "tokenizer file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read it as UTF-8 text ({e})") from None


def load_folder_tokenizer(folder, vocab_size: int) -> Tokenizer:
    """The tokenizer of an HF model folder: tokenizer.json, else GPT-2's vocab.json + merges.txt
    (tokenizers/gpt2.py), else tokenizer.model (spm.py), each with the folder's special tokens
    and chat template."""
    from .gpt2 import load_bpe

    folder = Path(folder)
    settings = folder_settings(folder)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_json(_read_text(folder / "tokenizer.json"), vocab_size, settings,
                                     folder / "tokenizer.json")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return load_bpe(folder / "vocab.json", vocab_size, settings)
    if (folder / "tokenizer.model").is_file():
        from .spm import SentencePieceTokenizer

        return SentencePieceTokenizer.load(folder / "tokenizer.model", vocab_size, settings)
    if (folder / "tokenizer.bin").is_file():
        from .llama2c import Llama2cTokenizer

        return Llama2cTokenizer.load(folder / "tokenizer.bin", vocab_size)
    raise TokenizerError(f"{folder}: expected tokenizer.json, vocab.json + merges.txt or tokenizer.model in the model "
                         "folder, found none; "
                         "pass -z TOKENIZER")


__all__ = ["HFTokenizer", "folder_settings", "load_folder_tokenizer", "byte_decoder"]
