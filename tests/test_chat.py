"""Chat and the generation loop against llama2.c's own run.c: the tokens fed at every position.

tests/fixtures/chat_runc.json was recorded with llama2.c's run.c (commit 350e04f) built with
`gcc -Ofast -march=native`, patched only to print each token it feeds to forward() on stderr, on
`chat_model()` below (a random model whose EOS logit is raised, so replies end and several turns
happen), with `-m chat -y "be nice" -i "the cat"`, the fixture's flags, and its `users` lines on
stdin. The fed stream holds every prompt token, every reply token and every EOS, so it pins
run.c's RNG use (one draw per forced position, one after feeding EOS) and its turn rules.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import random_weights

from babyllama.api import Model
from babyllama.arch.llama import Weights
from babyllama.config import ModelConfig
from babyllama.engine import Engine
from babyllama.generation import Chat, pieces
from babyllama.sampling import Sampler
from babyllama.testing import small_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "chat_runc.json"


def chat_model() -> Model:
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=256,
                      shared_classifier=False)
    w = random_weights(cfg, seed=11, scale=0.3)
    w["wcls"][2] = w["wcls"][2] + np.float32(1 / np.sqrt(32))  # EOS more likely: replies end
    return Model(Engine(cfg, Weights.from_dict(cfg, w)), small_tokenizer(300))


class Recording:
    """An engine that records every token fed to it, in position order."""

    def __init__(self, engine):
        self.engine, self.config, self.fed = engine, engine.config, []

    def new_state(self):
        return self.engine.new_state()

    def forward(self, tokens, pos, state):
        assert pos == len(self.fed)
        self.fed += [int(t) for t in tokens]
        return self.engine.forward(tokens, pos, state)

    def step(self, token, pos, state):
        assert pos == len(self.fed)
        self.fed.append(int(token))
        return self.engine.step(token, pos, state)


CASES = json.loads(FIXTURE.read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c["flags"]) for c in CASES])
def test_chat_feeds_what_run_c_feeds(case):
    model = chat_model()
    flags = dict(zip(case["flags"][::2], case["flags"][1::2]))
    engine = Recording(model.engine)
    chat = Chat(engine, model.tokenizer, "be nice", int(flags["-n"]), float(flags["-t"]), float(flags.get("-p", 0.9)),
                int(flags.get("-s", 0)) or None)
    reasons = []
    for user in case["users"]:
        assert not chat.full
        text = "".join(chat.turn(user))
        assert isinstance(text, str)
        reasons.append(chat.finish_reason)
    assert chat.full
    assert engine.fed == case["fed_tokens"]
    assert reasons[:-1] == ["stop"] * (len(reasons) - 1)  # every turn but the last ended at EOS
    assert sum(t == 2 for t in engine.fed) == reasons.count("stop")


def test_chat_turn_longer_than_the_context_left_is_refused():
    model = chat_model()
    chat = model.chat(steps=20, temperature=0.0)
    with pytest.raises(Exception, match="positions of the context are left"):
        list(chat.turn("the cat " * 20))


def test_pieces_forced_then_sampled_and_the_text_is_the_decoded_stream():
    model = chat_model()
    prompt = model.encode("the cat and")
    got = list(pieces(model.engine, model.tokenizer, prompt, 60, Sampler(300, 0.8, 0.9, seed=3)))
    ids = [p.id for p in got if p.id >= 0]
    assert [p.forced for p in got[: len(prompt) - 1]] == [True] * (len(prompt) - 1)
    assert not any(p.forced for p in got[len(prompt) - 1 :])
    assert ids[: len(prompt) - 1] == prompt[1:]
    tok, prev, printed = model.tokenizer, 1, b""
    for t in ids:  # what run.c prints (an EOS prints its piece; only BOS stops), as UTF-8
        printed += tok.token_bytes(prev, t)
        prev = t
    assert "".join(p.text for p in got) == printed.decode("utf-8", "replace")
    stops = [i for i, t in enumerate(ids) if t == 1 and i >= len(prompt) - 1]
    assert len(ids) == 60 or stops == [len(ids) - 1]  # 60 positions, or a sampled BOS ends it (run.c)


def test_pieces_stop_at_a_sampled_stop_token():
    model = chat_model()
    stop_first = lambda logits: 1  # noqa: E731  (always samples BOS, run.c's stop token)
    got = list(pieces(model.engine, model.tokenizer, [1, 5], 40, stop_first))
    assert [p.id for p in got] == [5, 1] and got[-1].forced is False
