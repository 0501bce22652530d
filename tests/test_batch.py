"""Many tokens per pass: prefill blocks, many sequences, speculative decoding -- each sequence
still gets exactly the tokens (and the logits) it gets alone."""

import json

import numpy as np
import pytest
from conftest import random_weights, tiny_tokenizer_file

from babyllama.api import Model
from babyllama.arch.llama import Weights
from babyllama.config import ModelConfig
from babyllama.engine import Engine
from babyllama.errors import GenerationError
from babyllama.formats.llama2c import write_checkpoint, write_quantized_checkpoint
from babyllama.generation import Sampling, Scheduler, generate_ids
from babyllama.generation.speculative import LookupDraft, ModelDraft, SpecStats, speculative_ids
from babyllama.quant import QuantWeights
from babyllama.sampling import Sampler

AWKWARD = {  # GQA, head size 6, dims leaving remainders past 8 and 16, an untied classifier
    "gqa-hs6": ModelConfig(dim=36, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=61, seq_len=40),
    "untied-odd": ModelConfig(dim=40, hidden_dim=84, n_layers=2, n_heads=5, n_kv_heads=5, vocab_size=75, seq_len=40,
                              shared_classifier=False),
}


def _engine(cfg, fmt, seed=1, parallel=None):
    w = Weights.from_dict(cfg, random_weights(cfg, seed=seed, scale=0.3))
    if fmt == "fp32":
        return Engine(cfg, w, parallel=parallel)
    return Engine(cfg, QuantWeights.from_float(w, 4, 8 if fmt == "int8" else 4), parallel=parallel)


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("name", list(AWKWARD))
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_prefill_block_is_token_by_token_bit_for_bit(name, fmt, parallel):
    cfg = AWKWARD[name]
    engine = _engine(cfg, fmt, parallel=parallel)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, cfg.seq_len)
    state = engine.new_state()
    one_by_one = np.stack([engine.step(int(t), i, state).copy() for i, t in enumerate(tokens)])
    block = engine.logits(tokens)  # one call: matrix-matrix kernels, causal attention inside the block
    assert np.array_equal(block.view(np.int32), one_by_one.view(np.int32))
    state = engine.new_state()  # and in uneven chunks
    chunks = [engine.forward(tokens[a:b], a, state, all_logits=True) for a, b in ((0, 5), (5, 6), (6, 23), (23, 40))]
    assert np.array_equal(np.concatenate(chunks).view(np.int32), one_by_one.view(np.int32))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny model in each format, tokenizer.bin beside them."""
    d = tmp_path_factory.mktemp("models")
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=96)
    w = Weights.from_dict(cfg, random_weights(cfg, seed=3, scale=0.3))
    write_checkpoint(d / "fp32.bin", cfg, w)
    write_quantized_checkpoint(d / "int8.bin", cfg, w, 2, 32)
    write_quantized_checkpoint(d / "int4.bin", cfg, w, 3, 32)
    tiny_tokenizer_file(d / "tokenizer.bin", cfg.vocab_size)
    return d


PROMPTS = ["the cat", "", "a dog and the bird and the cat and a hat", "the the the the", "hat"]


def _run_json(capsysbinary, path, *flags):
    from babyllama.cli import main

    assert main(["run", str(path), *flags, "--json"]) == 0
    return json.loads(capsysbinary.readouterr().out)


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_generate_batch_equals_run_for_every_prompt(capsysbinary, models, fmt):
    model = Model.load(models / f"{fmt}.bin")
    results = model.generate_batch(PROMPTS, steps=60, temperature=0.9, seed=7, max_sequences=2)  # 3 wait
    for i, (prompt, r) in enumerate(zip(PROMPTS, results)):
        alone = _run_json(capsysbinary, models / f"{fmt}.bin", "-n", "60", "-t", "0.9", "-s", str(7 + i), "-i", prompt)
        assert r.tokens == alone["tokens"] and r.text == alone["text"], i
        assert r.seed == 7 + i


def test_cancelling_one_sequence_changes_no_other(models):
    model = Model.load(models / "fp32.bin")
    ids = [model.encode(p) for p in PROMPTS]

    def run(cancel_at):
        sched = Scheduler(model.engine, max_sequences=3, max_rows=7)  # prompts prefill in chunks of <= 7 rows
        seqs = [sched.add(p, 80, Sampling(1.0, 0.9, 11 + i)) for i, p in enumerate(ids)]
        n = 0
        while sched.busy:
            sched.step()
            n += 1
            if n == cancel_at:
                sched.cancel(seqs[2])
        return seqs

    plain, cancelled = run(None), run(6)
    assert cancelled[2].finish_reason == "cancelled" and len(cancelled[2].tokens) < len(plain[2].tokens)
    for i in (0, 1, 3, 4):
        assert cancelled[i].all_tokens == plain[i].all_tokens, i
    alone = [list(generate_ids(model.engine, model.engine.new_state(), p, 80, Sampler(300, 1.0, 0.9, 11 + i)))
             for i, p in enumerate(ids)]
    assert [s.all_tokens[1:] for s in plain] == alone


def test_more_sequences_than_slots_wait_and_a_full_queue_refuses(models):
    model = Model.load(models / "fp32.bin")
    sched = Scheduler(model.engine, max_sequences=2, max_queue=3)
    seqs = [sched.add([1, 5, 9], 20, Sampling(0.0)) for _ in range(3)]
    with pytest.raises(GenerationError, match="the queue is full"):
        sched.add([1, 5], 20)
    sched.step()
    assert len(sched.running) == 2 and len(sched.queue) == 1
    sched.run_all()
    assert all(s.done and s.finish_reason == "length" and len(s.tokens) == 18 for s in seqs)
    with pytest.raises(GenerationError, match="longer than the model's context"):
        sched.add([1] * 97, 20)
    assert sched.state.free_pages == sched.state.n_pages  # every page came back


def test_prompts_file_prints_one_line_per_prompt_in_order(tmp_path, capsysbinary, models):
    from babyllama.cli import main

    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    assert main(["run", str(models / "int8.bin"), "--prompts", str(f), "-n", "40", "-s", "5", "--max-sequences", "2"]) == 0
    lines = [json.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert [r["index"] for r in lines] == list(range(len(PROMPTS)))
    alone = _run_json(capsysbinary, models / "int8.bin", "-n", "40", "-s", "8", "-i", PROMPTS[3])
    assert lines[3]["tokens"] == alone["tokens"] and lines[3]["seed"] == 8


def test_prompts_file_errors(tmp_path, capsysbinary, models):
    from babyllama.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["run", str(models / "fp32.bin"), "--prompts", str(empty)]) == 1
    assert "no prompts (expected one prompt per line)" in capsysbinary.readouterr().err.decode()
    long = tmp_path / "long.txt"
    long.write_text("the cat\n" + "the cat " * 60 + "\n")
    assert main(["run", str(models / "fp32.bin"), "--prompts", str(long)]) == 1
    err = capsysbinary.readouterr().err.decode()
    assert "line 2: the prompt is" in err and "longer than the model's context of 96" in err


@pytest.mark.parametrize("temperature, topp", [(0.0, 0.9), (0.8, 0.9), (1.0, 0.0)])
@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_speculative_decoding_gives_the_plain_tokens(models, temperature, topp, fmt):
    target = Model.load(models / f"{fmt}.bin")
    cfg = AWKWARD["gqa-hs6"]
    other = ModelConfig(**{**cfg.to_dict(), "vocab_size": 300, "seq_len": 96})  # a different, smaller model
    drafts = {"self": ModelDraft(Model.load(models / f"{fmt}.bin").engine, target.config),
              "other": ModelDraft(_engine(other, "fp32", seed=9), target.config),
              "lookup": LookupDraft(2)}
    prompt = target.encode("the cat and the dog and the cat and the")
    plain = list(generate_ids(target.engine, target.engine.new_state(), prompt, 90, Sampler(300, temperature, topp, 5)))
    for name, draft in drafts.items():
        stats = SpecStats()
        spec = list(speculative_ids(target.engine, target.engine.new_state(), prompt, 90,
                                    Sampler(300, temperature, topp, 5), draft, stats=stats))
        assert spec == plain, name
        assert stats.drafted > 0
        if name == "self":  # a draft equal to the target guesses every token, at any temperature
            assert stats.accepted == stats.drafted
        if name == "other":  # and a different one is wrong sometimes: the rollbacks ran
            assert stats.accepted < stats.drafted


def test_draft_length_adapts():
    class Wrong:  # always guesses a token the greedy target never picks
        def __init__(self):
            self.asked = []

        def propose(self, context, k, sampler=None):
            self.asked.append(k)
            return [0] * k

    cfg = AWKWARD["untied-odd"]
    engine = _engine(cfg, "fp32")
    logits_pick = lambda lg: int(np.argmax(lg[1:])) + 1  # noqa: E731  (never 0)
    draft = Wrong()
    list(speculative_ids(engine, engine.new_state(), [1, 5], 20, logits_pick, draft, k=4))
    assert draft.asked[:4] == [4, 3, 2, 1] and set(draft.asked[4:-1]) == {1}  # the last: what steps leave


def test_draft_with_another_vocabulary_is_refused(tmp_path, capsysbinary, models):
    from babyllama.cli import main

    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=200, seq_len=96)
    write_checkpoint(tmp_path / "draft.bin", cfg, Weights.from_dict(cfg, random_weights(cfg)))
    assert main(["run", str(models / "fp32.bin"), "--draft", str(tmp_path / "draft.bin")]) == 1
    assert "a vocabulary of 200 tokens, the target 300" in capsysbinary.readouterr().err.decode()
    with pytest.raises(SystemExit):
        main(["run", str(models / "fp32.bin"), "--lookup", "0"])
    assert "--lookup must be >= 1, got 0" in capsysbinary.readouterr().err.decode()


def test_run_draft_and_lookup_json(capsysbinary, models):
    plain = _run_json(capsysbinary, models / "fp32.bin", "-n", "70", "-s", "3", "-i", "the cat and the cat and")
    for flags in (["--draft", str(models / "fp32.bin")], ["--lookup", "3"]):
        spec = _run_json(capsysbinary, models / "fp32.bin", "-n", "70", "-s", "3", "-i", "the cat and the cat and", *flags)
        assert spec["tokens"] == plain["tokens"]
        assert spec["drafted_tokens"] >= spec["accepted_tokens"] >= 0 and "acceptance" in spec
