"""Hugging Face models and tokenizers built by the tests themselves (offline, tiny, random): what
tests/test_hf.py, test_gguf.py and test_fuzz.py compare babyllama against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Strings that trip tokenizers: accents, CJK, emoji (a ZWJ family: many byte tokens), runs of
# spaces, digits, tabs and CRLF, a soft hyphen and zero-width space, special tokens in the text.
HARD = ["Héllo  wörld, ça va?", "日本語のテキストと中文", "🦙🦙 emoji 👩‍👩‍👧 ok", "   runs   of    spaces  ",
        "digits 1234567890 and 3.14159", "tab\there\nnew line\r\nend", "", "ÿ\u00ad\u200b", "don't it's I'm",
        " leading space", "trailing space ", "\u2581written metaspace"]

CORPUS = ["Once upon a time there was a little llama named Lily who loved to play in the park.",
          "She said: \"Héllo, wörld! Ça va? Über schön.\" and laughed 123 times, then 4567 more.",
          "日本語のテキスト、中文的句子，还有한국어 문장.", "Emoji time 🦙🦙🎉 and 👩‍👩‍👧 went home.",
          "The quick brown fox jumps over the lazy dog; don't stop, it's fine, I'm here.",
          "    indented code\n\tand tabs\r\nand lines"] * 20

# Chat templates in the styles of Llama 3 (an end-of-turn token right after the content),
# Llama 2 (BOS per turn, " </s>" after a reply, raise_exception) and ChatML ("\n" after the end token).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, 日本?"},
            {"role": "assistant", "content": "Hello! 🦙"}, {"role": "user", "content": "Tell me more"}]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|im_start|>", "<|im_end|>"]


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj))


def byte_level_bpe(folder, vocab_size: int = 600, template: str = LLAMA3_TEMPLATE, pre: str = "llama-bpe") -> Path:
    """A Llama-3-style byte-level BPE trained here (tokenizers), saved as an HF tokenizer folder:
    BOS added by the post-processor, <|eot_id|> the eos_token, config.json listing two EOS ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from babyllama.tokenizers.gguf import LLAMA3_SPLIT

    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    tk = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    if pre == "llama-bpe":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # SmolLM's: digits one by one, then GPT-2's split
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tk.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": template, "clean_up_tokenization_spaces": True, "model_max_length": 4096})
    return folder


def sentencepiece_model(folder, vocab_size: int = 400, template: str = LLAMA2_TEMPLATE) -> Path:
    """A Llama-2-style sentencepiece BPE (byte fallback) trained here, saved as tokenizer.model with
    a LlamaTokenizer tokenizer_config.json."""
    import io

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   minloglevel=2, split_digits=True, allow_whitespace_only_pieces=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": template,
        "clean_up_tokenization_spaces": False})
    return folder


def hf_llama(folder, seed: int = 0, dtype: str = "float32", std: float = 0.1, model_type: str = "llama", **config):
    """A random LlamaForCausalLM (or MistralForCausalLM) saved with save_pretrained in `dtype`;
    returns the float32 torch model (for a bf16 save: its weights rounded to bf16, RoPE recomputed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5)
    base.update(config)
    config_cls, model_cls = (MistralConfig, MistralForCausalLM) if model_type == "mistral" else \
        (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**base)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, std)
    if dtype == "float32":
        model.save_pretrained(folder)
        return model
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return model_cls.from_pretrained(folder, dtype=torch.float32).eval()


def torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def torch_greedy(model, ids, n: int) -> list[int]:
    """transformers' greedy continuation (argmax, first maximum) of ids, n tokens."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(torch_logits(model, ids)[-1])))
    return ids[-n:]
