"""Hugging Face folders run (formats/hf.py, formats/assemble.py, tokenizers/hf.py, spm.py, the
Jinja chat template): logits equal transformers' LlamaForCausalLM on random configs saved in fp32
and bf16, tokenizers equal AutoTokenizer on hard strings, chat rendering equals
apply_chat_template, and broken folders are one-line errors."""

import json
import shutil

import numpy as np
import pytest
from hfmodels import (
    CHATML_TEMPLATE, HARD, LLAMA3_TEMPLATE, MESSAGES, byte_level_bpe, hf_llama, sentencepiece_model, torch_greedy,
    torch_logits, write_json,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from babyllama.api import Model  # noqa: E402
from babyllama.cli import main as cli_main  # noqa: E402
from babyllama.convert import convert, quantize_file  # noqa: E402
from babyllama.engine import Engine  # noqa: E402
from babyllama.errors import CheckpointError, GenerationError  # noqa: E402
from babyllama.formats import load_for_inference  # noqa: E402
from babyllama.formats.llama2c import load_checkpoint  # noqa: E402
from babyllama.generation import generate_ids  # noqa: E402
from babyllama.quant import group_size_problem  # noqa: E402
from babyllama.tokenizers import load_tokenizer  # noqa: E402
from babyllama.tokenizers.hf import folder_settings  # noqa: E402
from babyllama.tokenizers.spm import SentencePieceTokenizer  # noqa: E402

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}  # 16 < the 64 positions tested, so the scaling matters
ARCHS = {
    "llama2-mha": dict(),
    "llama3-gqa-scaled": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                              rope_scaling=LLAMA3_SCALING),
    "tied-smollm": dict(tie_word_embeddings=True, num_key_value_heads=2),
    "head-dim-24": dict(head_dim=24, num_key_value_heads=2),
    "mistral-no-window": dict(model_type="mistral", sliding_window=None, num_key_value_heads=2, rope_theta=1e6),
}
IDS = list(np.random.default_rng(7).integers(0, 300, 48))


def engine_of(folder, quantize=None) -> Engine:
    loaded = load_for_inference(folder, quantize, own_tokenizer=False)
    return Engine(loaded.config, loaded.weights)


def greedy(engine, ids, n):
    out = generate_ids(engine, engine.new_state(), ids, len(ids) + n - 1, lambda lg: int(np.argmax(lg)), stop_ids=())
    return list(out)[len(ids) - 1:]


def one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


# ---------------------------------------------------------------------------------------------
# logits against transformers


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_and_greedy_tokens_equal_transformers(tmp_path, arch):
    kw = dict(ARCHS[arch])
    model = hf_llama(tmp_path / "m", seed=1, **kw)
    ours = engine_of(tmp_path / "m")
    np.testing.assert_allclose(ours.logits(IDS), torch_logits(model, IDS), atol=1e-4, rtol=0)
    assert greedy(ours, IDS[:5], 24) == torch_greedy(model, IDS[:5], 24)


@pytest.mark.parametrize("arch", ["llama3-gqa-scaled", "tied-smollm"])
def test_bf16_files_within_bf16_tolerance_and_exact_in_fp32(tmp_path, arch):
    model = hf_llama(tmp_path / "m", seed=2, dtype="bfloat16", **ARCHS[arch])  # fp32 over the bf16-rounded weights
    ours = engine_of(tmp_path / "m")
    logits = ours.logits(IDS)
    np.testing.assert_allclose(logits, torch_logits(model, IDS), atol=1e-4, rtol=0)
    assert greedy(ours, IDS[:5], 24) == torch_greedy(model, IDS[:5], 24)
    native = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    ref = torch_logits(native, IDS)  # transformers computing in bf16 (8 bits of mantissa per step)
    assert np.abs(logits - ref).max() <= 0.05 * np.abs(ref).max()


def test_fp32_embedding_is_mapped_bf16_is_converted_once(tmp_path):
    hf_llama(tmp_path / "f32", seed=3)
    hf_llama(tmp_path / "bf16", seed=3, dtype="bfloat16")
    w32 = load_for_inference(tmp_path / "f32", own_tokenizer=False).weights
    assert not w32.token_embedding.flags.writeable and not w32.token_embedding.flags.owndata  # a view of the file
    assert not w32.wcls.flags.writeable
    w16 = load_for_inference(tmp_path / "bf16", own_tokenizer=False).weights
    assert w16.token_embedding.dtype == np.float32 and w16.token_embedding.flags.writeable


def test_sharded_folder_loads_like_one_file(tmp_path):
    model = hf_llama(tmp_path / "one", seed=4)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    np.testing.assert_array_equal(engine_of(tmp_path / "sharded").logits(IDS), engine_of(tmp_path / "one").logits(IDS))


def test_quantize_at_load_is_babyllama_quantize_of_the_same_weights(tmp_path):
    hf_llama(tmp_path / "m", seed=5, dtype="bfloat16", num_key_value_heads=2)
    convert(tmp_path / "m", tmp_path / "m.bin", "bin", version=1)
    for bits in (8, 4):
        quantize_file(tmp_path / "m.bin", tmp_path / f"q{bits}.bin", bits)
        ref = Engine.from_checkpoint(load_checkpoint(tmp_path / f"q{bits}.bin"))
        at_load = engine_of(tmp_path / "m", quantize=bits)
        assert at_load.bits == bits and at_load.group_size == ref.group_size
        np.testing.assert_array_equal(at_load.logits(IDS), ref.logits(IDS))
        quantize_file(tmp_path / "m", tmp_path / f"direct{bits}.bin", bits)  # an HF folder straight to v2/v3
        assert (tmp_path / f"direct{bits}.bin").read_bytes() == (tmp_path / f"q{bits}.bin").read_bytes()


def test_group_size_must_divide_q_dim_when_head_dim_is_given(tmp_path):
    hf_llama(tmp_path / "m", seed=6, hidden_size=64, intermediate_size=128, head_dim=20)  # q_dim 80
    cfg = load_for_inference(tmp_path / "m", own_tokenizer=False).config
    assert cfg.q_dim == 80
    assert "q_dim (80" in group_size_problem(cfg, 32, 8)
    engine = engine_of(tmp_path / "m", quantize=8)
    assert engine.group_size == 16 and np.isfinite(engine.logits(IDS[:8])).all()


def test_hf_round_trip_export_import_same_logits(tmp_path):
    hf_llama(tmp_path / "m", seed=8, **ARCHS["llama3-gqa-scaled"])
    convert(tmp_path / "m", tmp_path / "again", "hf")
    assert engine_of(tmp_path / "again").config == engine_of(tmp_path / "m").config
    np.testing.assert_array_equal(engine_of(tmp_path / "again").logits(IDS), engine_of(tmp_path / "m").logits(IDS))


# ---------------------------------------------------------------------------------------------
# tokenizers against AutoTokenizer


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = byte_level_bpe(tmp_path_factory.mktemp("bpe"))
    write_json(folder / "config.json", {"model_type": "llama", "bos_token_id": 0, "eos_token_id": [1, 2]})
    write_json(folder / "generation_config.json", {"eos_token_id": [1, 2]})
    return folder


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    folder = sentencepiece_model(tmp_path_factory.mktemp("spm"))
    fast = folder.parent / "spm_fast"
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(fast)  # transformers' own tokenizer.json
    return folder


def _auto(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def assert_same_as_auto(ours, auto, strings):
    for s in strings:
        assert ours.encode(s) == auto.encode(s), s
        assert ours.encode(s, bos=False) == auto.encode(s, add_special_tokens=False), s
        ids = auto.encode(s)
        assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), s


def test_byte_level_bpe_equals_autotokenizer(bpe_folder):
    ours = load_tokenizer(bpe_folder, 600)
    assert_same_as_auto(ours, _auto(bpe_folder), HARD + ["<|eot_id|> special <|begin_of_text|>in text<|im_end|>"])
    assert ours.bos_id == 0 and ours.eos_ids == (2, 1) and ours.stop_ids == (2, 1)  # <|eot_id|> first


@pytest.mark.parametrize("form", ["tokenizer.json", "tokenizer.model"])
def test_sentencepiece_equals_autotokenizer(spm_folder, form):
    auto = _auto(spm_folder)
    if form == "tokenizer.json":
        ours = load_tokenizer(spm_folder.parent / "spm_fast", 400)
    else:
        ours = SentencePieceTokenizer.load(spm_folder / "tokenizer.model", 400, folder_settings(spm_folder))
    assert_same_as_auto(ours, auto, HARD + ["<s> in </s>text<unk>", "<s>hi", "x<s>hi"])
    assert (ours.bos_id, ours.eos_ids) == (1, (2,))


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_streaming_never_splits_a_character(bpe_folder, spm_folder, which):
    tok = load_tokenizer(bpe_folder if which == "bpe" else spm_folder.parent / "spm_fast", 600 if which == "bpe" else 400)
    text = "dragons 🐉 sum ∑ ok"  # characters the vocabulary never saw: one token per byte
    ids = tok.encode(text)
    stream, prev, chunks = tok.stream(), ids[0], []
    for t in ids[1:]:
        chunks.append(stream.feed(prev, t))
        prev = t
    chunks.append(stream.flush())
    assert "".join(chunks) == text and "\ufffd" not in "".join(chunks)
    assert sum(1 for c in chunks if c) < len(ids) - 1  # some feeds held bytes back until a character was whole


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, CHATML_TEMPLATE], ids=["llama3", "chatml"])
def test_chat_template_renders_as_apply_chat_template(tmp_path, template):
    folder = byte_level_bpe(tmp_path / "tok", template=template)
    ours, auto = load_tokenizer(folder, 600), _auto(folder)
    for gen in (True, False):
        text = auto.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert ours.chat_template.render(MESSAGES, gen) == text
        assert ours.chat_template.conversation(ours, MESSAGES, gen) == auto.encode(text, add_special_tokens=False)


def test_llama2_style_template_and_its_raise_exception(spm_folder):
    ours, auto = load_tokenizer(spm_folder.parent / "spm_fast", 400), _auto(spm_folder)
    text = auto.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.chat_template.render(MESSAGES) == text and text.startswith("<s>[INST] <<SYS>>")
    with pytest.raises(GenerationError, match="roles must alternate") as e:
        ours.chat_template.render(MESSAGES[:2] + MESSAGES[1:2])
    one_line_error(e)


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, CHATML_TEMPLATE], ids=["llama3", "chatml"])
def test_session_turns_feed_what_the_whole_conversation_renders(tmp_path, template):
    """turn 1 + the reply + its EOS + turn 2 are the ids of the conversation rendered whole."""
    folder = byte_level_bpe(tmp_path / "tok", template=template)
    tok = load_tokenizer(folder, 600)
    eos = tok.encode("<|im_end|>" if template == CHATML_TEMPLATE else "<|eot_id|>", bos=False)
    tok.eos_ids = tuple(eos)
    first = tok.chat_template.turn(tok, MESSAGES[1]["content"], MESSAGES[0]["content"], True)
    second = tok.chat_template.turn(tok, MESSAGES[3]["content"], MESSAGES[0]["content"], False)
    reply = tok.encode(MESSAGES[2]["content"], bos=False)
    assert first + reply + eos + second == tok.chat_template.conversation(tok, MESSAGES)


# ---------------------------------------------------------------------------------------------
# the whole path: babyllama run on an HF folder


def _hf_with_tokenizer(tmp_path, **kw):
    folder = tmp_path / "model"
    hf_llama(folder, seed=9, vocab_size=600, **kw)
    byte_level_bpe(tmp_path / "tok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / f, folder / f)
    config = json.loads((folder / "config.json").read_text())
    write_json(folder / "config.json", {**config, "bos_token_id": 0, "eos_token_id": 2})
    return folder


def test_run_an_hf_folder_and_chat_with_its_template(tmp_path, capsysbinary, monkeypatch):
    folder = _hf_with_tokenizer(tmp_path)
    model = Model.load(folder)
    text = "".join(model.generate("Once upon a time", steps=20, temperature=0.0))
    assert text.startswith("Once upon a time") and len(model.encode(text)) > 5
    assert cli_main(["run", str(folder), "-t", "0", "-n", "20", "-i", "Once upon a time", "--quantize", "8"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"Once upon a time")
    chat = model.chat(system="Be brief.", steps=60, temperature=0.0)
    reply = "".join(chat.turn("Hi there"))
    assert chat.pos > 10 and isinstance(reply, str)


# ---------------------------------------------------------------------------------------------
# broken folders: one line each


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    write_json(folder / "config.json", config)


@pytest.mark.parametrize("changes, needles", [
    ({"hidden_size": None}, ["missing key 'hidden_size'"]),
    ({"hidden_size": "64"}, ["hidden_size: expected a positive integer", "'64'"]),
    ({"num_hidden_layers": 1 << 40}, ["num_hidden_layers: expected a positive integer up to"]),
    ({"num_hidden_layers": (1 << 31) - 1}, ["the config's 2147483647 layers need 19327352826 tensors, the file holds 21"]),
    ({"max_position_embeddings": 10 ** 12}, ["max_position_embeddings: expected a positive integer up to 16777216"]),
    ({"model_type": "qwen2"}, ["model_type: expected one of 'llama', 'mistral'", "'qwen2'"]),  # (gpt2: hf_gpt2.py)
    ({"architectures": ["Qwen2ForCausalLM"]}, ["architectures: expected LlamaForCausalLM", "Qwen2ForCausalLM"]),
    ({"attention_bias": True}, ["attention_bias: expected False"]),
    ({"model_type": "mistral", "sliding_window": 16}, ["sliding_window: expected null or at least", "found 16"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, ["rope_parameters.rope_type", "'yarn'"]),
    ({"hidden_size": 128}, ["expected shape", "from the config, found"]),
])
def test_bad_configs_are_one_line_errors(tmp_path, changes, needles):
    hf_llama(tmp_path / "m", seed=10)
    _edit_config(tmp_path / "m", **changes)
    with pytest.raises(CheckpointError) as e:
        load_for_inference(tmp_path / "m", own_tokenizer=False)
    one_line_error(e, *needles)


def _save(folder, tensors):
    import safetensors.numpy

    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_bad_safetensors_are_one_line_errors(tmp_path, capsys):
    import safetensors.numpy

    hf_llama(tmp_path / "m", seed=11)
    st = tmp_path / "m" / "model.safetensors"
    good = st.read_bytes()
    tensors = safetensors.numpy.load_file(str(st))
    cases = [
        (good[:-100], ["not a valid safetensors file"]),
        (b"GGUF not safetensors at all" * 10, ["not a valid safetensors file"]),
        (b"", ["is empty"]),
    ]
    for data, needles in cases:
        st.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_for_inference(tmp_path / "m", own_tokenizer=False)
        one_line_error(e, *needles)
    _save(tmp_path / "m", {**tensors, "model.embed_tokens.weight": tensors["model.embed_tokens.weight"].astype(np.int8)})
    with pytest.raises(CheckpointError) as e:
        load_for_inference(tmp_path / "m", own_tokenizer=False)
    one_line_error(e, "model.embed_tokens.weight: expected dtype F32, F16 or BF16, found I8")
    _save(tmp_path / "m", {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(CheckpointError) as e:
        load_for_inference(tmp_path / "m", own_tokenizer=False)
    one_line_error(e, "q_proj.bias: biases are not part")
    _save(tmp_path / "m", {k: v for k, v in tensors.items() if "layers.1.mlp" not in k})
    with pytest.raises(CheckpointError) as e:
        load_for_inference(tmp_path / "m", own_tokenizer=False)
    one_line_error(e, "missing tensors: expected model.layers.1.mlp")
    st.write_bytes(good[:-100])
    capsys.readouterr()  # transformers' progress bars
    assert cli_main(["run", str(tmp_path / "m"), "-n", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("babyllama run: error: ") and err.count("\n") == 1, err


def test_sharded_index_naming_files_outside_the_folder_is_refused(tmp_path):
    model = hf_llama(tmp_path / "m", seed=12)
    model.save_pretrained(tmp_path / "s", max_shard_size="40KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../m/model.safetensors"
    write_json(tmp_path / "s" / "model.safetensors.index.json", index)
    with pytest.raises(CheckpointError) as e:
        load_for_inference(tmp_path / "s", own_tokenizer=False)
    one_line_error(e, "weight_map names shard '../m/model.safetensors'")
