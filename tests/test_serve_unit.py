"""The server's parts without a server: the scheduler's per-sequence logits processing and logprobs
(batch invariance kept), OpenAI's penalties and bias, stop strings across tokens, request checks,
and /health while the engine warms up."""

import asyncio
import json

import numpy as np
import pytest

from babyllama.api import Model
from babyllama.generation import Sampling, Scheduler, generate_ids
from babyllama.sampling import LogitsProcessor, log_softmax, top_logprobs
from babyllama.testing import small_tokenizer

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")

from babyllama.serve.choice import ChoiceText  # noqa: E402
from babyllama.serve.schemas import APIError, chat_request, completion_request  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return Model.load()  # the bundled model: real text, 512 tokens, context 256


def solo(model, prompt, steps, sampling):
    """A sequence's tokens alone: run.c's loop (what `babyllama run` runs) on a fresh state."""
    engine = model.engine
    return list(generate_ids(engine, engine.new_state(), prompt, steps, sampling.sampler(engine.config.vocab_size),
                             model.tokenizer.stop_ids))[len(prompt) - 1:]


# ---------------------------------------------------------------------------- scheduler extensions


def test_seeded_sequence_is_the_same_alone_and_among_32_others_with_extras(model):
    """The options other sequences use (processors, logprobs) never change a plain one's tokens."""
    prompt = model.encode("Once upon a time")
    sampling = Sampling(temperature=0.9, topp=0.9, seed=1234)
    alone = solo(model, prompt, 120, sampling)
    sched = Scheduler(model.engine, max_sequences=33)
    others = []
    for i in range(32):
        extra = dict(logprobs=i % 5) if i % 2 else dict(processor=LogitsProcessor(512, {5: 3.0}, 0.5, 0.3))
        others.append(sched.add(model.encode(f"The dog {i} ran"), 60 + i, Sampling(0.8, 0.9, 77 + i), (1,), **extra))
    for _ in range(3):  # it joins a running batch
        sched.step()
    target = sched.add(prompt, 120, sampling, (1,))
    sched.run_all()
    assert target.tokens == alone
    assert all(o.done for o in others)


def test_logprobs_are_the_processed_distribution_and_do_not_change_tokens(model):
    prompt = model.encode("Lily had a red ball")
    bias = LogitsProcessor(512, {300: 4.0, 7: -2.0}, presence_penalty=0.7, frequency_penalty=0.4)
    plain = Scheduler(model.engine, 2)
    a = plain.add(prompt, 40, Sampling(1.0, 0.95, 5), (1,), processor=bias)
    plain.run_all()
    sched = Scheduler(model.engine, 2)
    b = sched.add(prompt, 40, Sampling(1.0, 0.95, 5), (1,), processor=bias, logprobs=3)
    events = []
    while sched.busy:
        events += sched.step()
    assert b.tokens == a.tokens  # asking for logprobs changes nothing sampled
    # recompute every event's distribution: the logits of the prefix, the processor, log-softmax
    logits = model.logits(prompt + b.tokens[:-1])[len(prompt) - 1:]
    for k, e in enumerate(events):
        row = logits[k].copy()
        bias(row, b.tokens[:k])
        ref = log_softmax(row)
        assert e.logprob == pytest.approx(ref[e.token], abs=1e-9)
        assert [t for t, _ in e.top_logprobs] == list(np.argsort(-ref, kind="stable")[:3])
        assert [lp for _, lp in e.top_logprobs] == sorted((lp for _, lp in e.top_logprobs), reverse=True)
    assert np.exp([lp for _, lp in top_logprobs(ref, 512)]).sum() == pytest.approx(1.0)


def test_logits_processor_applies_openais_formula():
    logits = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    LogitsProcessor(5, {0: 10.0, 4: -100}, presence_penalty=0.5, frequency_penalty=0.25)(logits, [1, 1, 3])
    # token 1: 2 - 2*0.25 - 0.5; token 3: 4 - 0.25 - 0.5; 0 and 4 biased; 2 untouched
    assert logits.tolist() == [11.0, 1.0, 3.0, 3.25, -95.0]
    assert not LogitsProcessor(5).active
    with pytest.raises(ValueError, match="logit_bias"):
        LogitsProcessor(5, {5: 1.0})
    with pytest.raises(ValueError, match="presence_penalty"):
        LogitsProcessor(5, presence_penalty=2.5)


def test_logit_bias_steers_greedy_and_forbids(model):
    prompt = model.encode("Once upon a time")
    sched = Scheduler(model.engine, 2)
    forced = sched.add(prompt, 30, Sampling(0.0), (1,), processor=LogitsProcessor(512, {400: 100}))
    free = sched.add(prompt, 30, Sampling(0.0), (1,))
    sched.run_all()
    assert set(forced.tokens) == {400}
    banned = free.tokens[0]
    sched = Scheduler(model.engine, 1)
    s = sched.add(prompt, 30, Sampling(1.0, 1.0, 3), (1,), processor=LogitsProcessor(512, {banned: -100}))
    sched.run_all()
    assert banned not in s.tokens


# ---------------------------------------------------------------------------- stop strings


def feed_all(choice, tokenizer, text_tokens):
    out = []
    for i, t in enumerate(text_tokens):
        out.append(choice.feed(t, i == len(text_tokens) - 1))
        if choice.done:
            break
    return out


def test_stop_string_split_across_tokens_never_leaks():
    tok = small_tokenizer(300)
    ids = tok.encode("the cat sat. STOP here", bos=False)
    whole = tok.decode(ids, prev_token=1)
    cut = whole.index("STOP")
    # every stop string that ends inside "STOP" spans several tokens here (letters are single tokens)
    choice = ChoiceText(tok, [1], stop=("ST" "OP", "never"))
    pieces = feed_all(choice, tok, ids)
    assert "".join(pieces) == whole[:cut]
    assert choice.finish_reason == "stop"
    assert all("S" not in p for p in pieces)  # "S" was held back, then dropped with the stop string
    assert choice.tokens < len(ids)


def test_held_back_text_is_released_when_it_is_not_a_stop():
    tok = small_tokenizer(300)
    ids = tok.encode("a STOry, then more", bos=False)
    choice = ChoiceText(tok, [1], stop=("STOP",))
    pieces = feed_all(choice, tok, ids)
    assert "".join(pieces) == tok.decode(ids, prev_token=1)
    assert choice.finish_reason == "length"


def test_utf8_split_over_byte_tokens_comes_out_whole():
    tok = small_tokenizer(300)
    ids = [3 + b for b in "é🙂".encode()]  # byte tokens only
    choice = ChoiceText(tok, [1, 260])
    pieces = feed_all(choice, tok, ids)
    assert "".join(pieces) == "é🙂"
    assert all("\ufffd" not in p for p in pieces)


def test_a_stop_token_prints_nothing_and_counts():
    tok = small_tokenizer(300)
    choice = ChoiceText(tok, [1], stop_ids=(2,))
    assert choice.feed(tok.encode("the", bos=False)[0], False) == "the"
    assert choice.feed(2, True) == ""
    assert (choice.finish_reason, choice.tokens) == ("stop", 2)


# ---------------------------------------------------------------------------- request checks


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "top_p": -0.1}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 10**9}, "n"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"3": 101}}, "logit_bias"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_completion_requests_are_checked(body, param):
    with pytest.raises(APIError) as e:
        completion_request(body, 512)
    assert (e.value.status, e.value.param) == (400, param)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("messages, param", [
    (None, "messages"), ("hi", "messages"), ([], "messages"), (["hi"], "messages[0]"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"), ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
])
def test_chat_messages_must_be_role_content_objects(messages, param):
    with pytest.raises(APIError) as e:
        chat_request({"messages": messages}, 512)
    assert e.value.param == param


def test_valid_requests_become_settings_and_unknown_fields_are_ignored():
    prompts, p = completion_request({"prompt": [[1, 5], [1, 6]], "max_tokens": 8.0, "top_k": -1, "seed": -3,
                                     "stop": "x", "logit_bias": {"7": -100}, "unknown": {"a": 1}}, 512)
    assert prompts == [[1, 5], [1, 6]]
    assert (p.max_tokens, p.top_k, p.seed, p.stop, p.logit_bias, p.top_p) == (8, 0, -3, ("x",), {7: -100.0}, 1.0)
    messages, p = chat_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                             {"role": "user", "content": "b"}], "logprobs": True,
                                "max_completion_tokens": 4}, 512)
    assert messages == [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert (p.logprobs, p.max_tokens) == (0, 4)


# ---------------------------------------------------------------------------- the app, not started


def asgi_request(app, method, path, body=b""):
    """One request through the ASGI app without a server: (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_health_and_generation_answer_503_until_the_engine_is_ready(model):
    from babyllama.serve import create_app

    app = create_app(model, "m")  # its lifespan has not run: the scheduler thread is not started
    status, headers, body = asgi_request(app, "GET", "/health")
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert json.loads(body)["status"] == "loading"
    status, headers, body = asgi_request(app, "POST", "/v1/completions", b'{"prompt": "hi"}')
    assert status == 503 and json.loads(body)["error"]["code"] == "model_loading"
    status, _, body = asgi_request(app, "POST", "/v1/completions", b'{"prompt": 5}')  # bad input: 400 first
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt"


def test_chat_template_override_renders_chatml(model):
    from babyllama.serve import create_app
    from babyllama.tokenizers.chat import CHATML

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = json.dumps({"messages": messages}).encode()
    _, _, default = asgi_request(create_app(model, "m"), "POST", "/tokenize", body)
    _, _, chatml = asgi_request(create_app(model, "m", chat_template=CHATML), "POST", "/tokenize", body)
    assert json.loads(default)["tokens"] == model.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
    assert json.loads(chatml)["tokens"] == model.encode(CHATML.text(messages))


def test_a_models_own_jinja_template_is_the_default():
    from babyllama.serve import create_app
    from babyllama.tokenizers.chat import JinjaTemplate

    pytest.importorskip("jinja2", reason="the hf extra (jinja2) is not installed")
    model = Model.load()
    model.tokenizer.chat_template = JinjaTemplate(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "A story?"}]
    status, _, body = asgi_request(create_app(model, "m"), "POST", "/tokenize", json.dumps({"messages": messages}).encode())
    assert status == 200
    assert json.loads(body)["tokens"] == model.encode("user: Hi\nassistant: Hello\nuser: A story?\nassistant:",
                                                      bos=False)
