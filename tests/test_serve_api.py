"""`babyllama serve` through the real openai client: completions and chat, streamed and not, usage,
seeds equal to `babyllama run`, stop sequences, n, logprobs, logit_bias, errors as the client's
own exceptions; and a bounded load test of 32 concurrent streaming clients. One server (the
bundled model) for the whole module."""

import json
import subprocess
import sys

import pytest

openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

from babyllama.api import Model  # noqa: E402
from babyllama.serve.client import ServerProcess, babyllama_serve, get, run_clients, summary  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with ServerProcess(babyllama_serve("--port", "0", "--max-sequences", "40", "--max-queue", "40")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model():
    return Model.load()


def run_json(*args):
    out = subprocess.run([sys.executable, "-m", "babyllama", "run", *args, "--json"], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------- completions


def test_seeded_completion_equals_babyllama_run(client):
    ran = run_json("-n", "80", "-t", "0.8", "-p", "0.9", "-s", "42", "-i", "Once upon a time")
    n_prompt = ran["prompt_tokens"]
    out = client.completions.create(model="babyllama", prompt="Once upon a time", max_tokens=80 - n_prompt + 1,
                                    temperature=0.8, top_p=0.9, seed=42)
    assert "Once upon a time" + out.choices[0].text == ran["text"]
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == ran["generated_tokens"]
    assert out.usage.total_tokens == n_prompt + ran["generated_tokens"]
    assert out.choices[0].finish_reason == ("stop" if ran["tokens"][-1] == 1 else "length")
    assert out.object == "text_completion" and out.model == "babyllama" and out.id.startswith("cmpl-")
    echoed = client.completions.create(model="babyllama", prompt=ran["tokens"][:n_prompt], echo=True,
                                       max_tokens=80 - n_prompt + 1, temperature=0.8, top_p=0.9, seed=42)
    assert echoed.choices[0].text == ran["text"]  # token-id prompts, and echo, give the same


def test_streamed_completion_is_the_whole_one_in_pieces(client):
    kw = dict(model="babyllama", prompt="The little dog", max_tokens=60, temperature=1.0, seed=7)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_sequences_end_the_text_before_them(client):
    kw = dict(model="babyllama", prompt="Once upon a time", max_tokens=120, temperature=0.0)
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 5]  # five characters from the middle: several tokens
    first = text.index(stop)
    out = client.completions.create(**kw, stop=[stop, "never appears"])
    assert out.choices[0].text == text[:first] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:first]
    assert out.usage.completion_tokens < client.completions.create(**kw).usage.completion_tokens


def test_n_choices_and_prompt_lists_are_seeded_in_order(client):
    out = client.completions.create(model="babyllama", prompt=["A cat", "A dog"], n=2, max_tokens=20, seed=100)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(["A cat", "A cat", "A dog", "A dog"]):
        alone = client.completions.create(model="babyllama", prompt=prompt, max_tokens=20, seed=100 + i)
        assert out.choices[i].text == alone.choices[0].text
    assert out.usage.prompt_tokens == 2 * len(Model.load().encode("A cat"))


def test_completion_logprobs_and_logit_bias(client, model):
    out = client.completions.create(model="babyllama", prompt="Once", max_tokens=8, temperature=0, logprobs=3,
                                    logit_bias={"400": 100})
    lp = out.choices[0].logprobs
    piece = model.tokenizer.decode([400], prev_token=5)  # id 400's text (not after BOS)
    assert lp.tokens == [piece] * 8 and out.choices[0].text == piece * 8
    assert all(-1e-3 < x <= 0 for x in lp.token_logprobs)  # +100 makes it a certainty
    assert all(list(t)[0] == piece and len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset == [i * len(piece) for i in range(8)]


# ---------------------------------------------------------------------------- chat


def test_chat_equals_run_c_chat_and_streams_role_first(client, model):
    kw = dict(model="babyllama", messages=[{"role": "system", "content": "You tell stories."},
                                           {"role": "user", "content": "Tell me about a cat"}],
              max_tokens=60, temperature=0.9, top_p=0.9, seed=11)
    whole = client.chat.completions.create(**kw)
    # what `babyllama run -m chat -y ... -i ... -s 11 -t 0.9 -p 0.9` prints for the reply
    ids = model.tokenizer.chat_template.conversation(model.tokenizer, kw["messages"])
    chat = model.chat(system="You tell stories.", steps=len(ids) + 59, temperature=0.9, topp=0.9, seed=11)
    assert whole.choices[0].message.content == "".join(chat.turn("Tell me about a cat"))
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    assert whole.choices[0].finish_reason == chat.finish_reason
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_chat_logprobs_and_penalties(client):
    msgs = [{"role": "user", "content": "Hello"}]
    out = client.chat.completions.create(model="babyllama", messages=msgs, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=2)
    entries = out.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == out.choices[0].message.content
    for e in entries:  # greedy: the chosen token is the likeliest one
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token
    plain = client.chat.completions.create(model="babyllama", messages=msgs, max_tokens=40, temperature=0)
    penalised = client.chat.completions.create(model="babyllama", messages=msgs, max_tokens=40, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content != plain.choices[0].message.content


# ---------------------------------------------------------------------------- errors


def test_errors_are_the_clients_own_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="babyllama", prompt="Once upon a time", max_tokens=300)
    assert e.value.code == "context_length_exceeded" and "context of 256" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="babyllama", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="babyllama", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    # without max_tokens, the default (16) is capped by what the context has left: 256 + 1 - 250
    out = client.completions.create(model="babyllama", prompt=[1] + [300] * 249, logit_bias={"1": -100})
    assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == ["babyllama"]
    assert client.models.retrieve("babyllama").id == "babyllama"


def test_tokenize_and_detokenize(server, model):
    import httpx2

    r = httpx2.post(server.url + "/tokenize", json={"prompt": "Once upon a time"}).json()
    assert r["tokens"] == model.encode("Once upon a time") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    back = httpx2.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "Once upon a time"
    chat = httpx2.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == model.encode("[INST] hi [/INST]")


# ---------------------------------------------------------------------------- load


def test_32_concurrent_streaming_clients(server, model):
    """Every request completes, no token is lost or duplicated, and every seeded output is exactly
    its solo output, while 32 clients stream at once (2 requests each, loopback, bounded)."""
    bodies = [[{"model": "babyllama", "prompt": f"Once upon a time, {name} ", "max_tokens": 40 + 3 * i + j,
                "temperature": 0.9, "top_p": 0.9, "seed": 1000 + 2 * i + j, "stream_options": {"include_usage": True}}
               for j in range(2)] for i, name in enumerate(f"kid{k}" for k in range(32))]
    results, wall = run_clients(server.url, bodies, timeout=120)
    for client_bodies, client_results in zip(bodies, results):
        for body, r in zip(client_bodies, client_results):
            assert r.status == 200 and r.error is None
            prompt = model.encode(body["prompt"])
            steps = len(prompt) - 1 + body["max_tokens"]
            alone = [p for p in model.pieces(prompt, steps, 0.9, 0.9, body["seed"]) if not p.forced]
            assert r.text == "".join(p.text for p in alone)
            assert r.tokens == sum(p.id >= 0 for p in alone)  # usage: every sampled token, once
    stats = summary(results, wall)
    assert stats["requests"] == 64 and stats["failed"] == 0
    status, text = get(server.url + "/metrics")
    metrics = text.decode()
    assert status == 200 and 'babyllama_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    # the batch really ran many sequences per step
    count = float(next(x for x in metrics.splitlines() if x.startswith("babyllama_batch_sequences_count")).split()[1])
    small = float(next(x for x in metrics.splitlines()
                       if x.startswith('babyllama_batch_sequences_bucket{le="4.0"}')).split()[1])
    assert small < count  # some steps sampled more than 4 sequences at once
