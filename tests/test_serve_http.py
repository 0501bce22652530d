"""`babyllama serve` over raw HTTP: malformed requests, the API key, the body limit, a full queue,
a client that disconnects, and Ctrl-C. The server runs a random model large enough that a long
request is still running while the test looks at it (context 1024, one slot, one queue place)."""

import http.client
import json
import signal
import socket
import time

import pytest

pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

from babyllama.config import ModelConfig  # noqa: E402
from babyllama.serve.client import ServerProcess, babyllama_serve, get  # noqa: E402
from babyllama.testing import random_model, small_tokenizer  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# a few milliseconds a token on any machine: 900 tokens take seconds
SLOW = ModelConfig(dim=384, hidden_dim=1024, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=512, seq_len=1024)
LONG = {"prompt": "the", "max_tokens": 900, "stream": True, "logit_bias": {"1": -100}}  # BOS banned: never stops early


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow")
    random_model(SLOW, folder / "slow.bin")
    small_tokenizer(512).save(folder / "tokenizer.bin")
    return folder / "slow.bin"


@pytest.fixture(scope="module")
def server(slow_model):
    args = ("--port", "0", "--api-key", KEY, "--max-sequences", "1", "--max-queue", "1", "--max-body", "65536")
    with ServerProcess(babyllama_serve(str(slow_model), *args)) as s:
        yield s


def request(server, method, path, body=b"", headers=AUTH):
    """(status, headers, parsed JSON body) of one request on a new connection."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        data = r.read()
        return r.status, dict(r.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def post(server, path, obj, headers=AUTH):
    return request(server, "POST", path, json.dumps(obj).encode(), headers)


def open_stream(server, body, headers=AUTH):
    """A raw streaming request; returns the socket once the response headers (and, when the
    sequence runs, its first event) have arrived."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
           f"Content-Length: {len(data)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode() + data)
    return sock


def read_until(sock, marker: bytes, limit=1 << 20) -> bytes:
    got = b""
    while marker not in got and len(got) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def metric(server, name) -> float:
    _, text = get(server.url + "/metrics")
    line = next(x for x in text.decode().splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---------------------------------------------------------------------------- auth, health


def test_api_key_guards_v1_and_health_stays_open(server):
    status, _, body = request(server, "GET", "/v1/models", headers={})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert request(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request(server, "POST", "/tokenize", b'{"prompt": "a"}', headers={})[0] == 401
    assert request(server, "GET", "/v1/models")[0] == 200
    assert request(server, "GET", "/health", headers={}) [0] == 200
    page = get(server.url + "/")
    assert page[0] == 200 and b"<title>babyllama chat</title>" in page[1]


# ---------------------------------------------------------------------------- malformed requests

MALFORMED = [
    ("/v1/completions", b'{"prompt": "x", ', 400),  # truncated JSON
    ("/v1/completions", b"\xff\xfe{}", 400),  # not UTF-8
    ("/v1/completions", b"", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", b"[" * 60000, 400),  # nested too deeply for a recursive parser
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e308}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -5}', 400),
    ("/v1/completions", b'{"prompt": "x", "n": 100000}', 400),
    ("/v1/completions", b'{"prompt": "x", "n": 3}', 400),  # more than this server's 1 slot + 1 queue place
    ("/v1/completions", b'{"prompt": "x", "logit_bias": []}', 400),
    ("/v1/completions", b'{"prompt": [[]]}', 400),
    ("/v1/completions", b'{"prompt": [-1]}', 400),
    ("/v1/completions", b'{"prompt": "\\ud800 lone surrogate"}', 400),
    ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404),
    ("/v1/completions", b'{"prompt": "x", "model": 7}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1025}', 400),  # beyond the context
    ("/v1/chat/completions", b'{"messages": "hi"}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [["user", "x"]]}', 400),
    ("/detokenize", b'{"tokens": [99999]}', 400),
    ("/tokenize", b'{"prompt": 5}', 400),
]


@pytest.mark.parametrize("path, body, status", MALFORMED)
def test_malformed_requests_get_4xx_with_openais_error_body(server, path, body, status):
    got, headers, answer = request(server, "POST", path, body)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]


def test_prompt_far_beyond_the_context_is_refused_quickly(server):
    t0 = time.perf_counter()
    status, _, body = post(server, "/v1/completions", {"prompt": "once " * 12000})
    assert status == 400 and "context" in body["error"]["message"]
    assert time.perf_counter() - t0 < 2


def test_body_limit_unknown_routes_and_methods(server):
    status, _, body = request(server, "POST", "/v1/completions", b'{"prompt": "' + b"a" * 70000 + b'"}')
    assert status == 413 and body["error"]["code"] == "body_too_large"
    # without a Content-Length the limit holds as the body streams in
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"a" * 70000, b'"}']),
                 headers={**AUTH, "Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"
    conn.close()
    status, _, body = request(server, "GET", "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, _, body = request(server, "GET", "/v1/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


def test_the_server_is_still_up_after_all_that(server):
    status, _, body = post(server, "/v1/completions", {"prompt": "the", "max_tokens": 5, "seed": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 5
    assert request(server, "GET", "/health")[0] == 200


# ---------------------------------------------------------------------------- scheduling


def test_full_queue_is_503_with_retry_after_and_disconnects_free_the_slot(server):
    generated = metric(server, "babyllama_generation_tokens_total")
    running = open_stream(server, LONG)
    assert b"data: " in read_until(running, b"data: {")  # it holds the one slot
    queued = open_stream(server, LONG)  # takes the one queue place
    assert wait_for(lambda: metric(server, "babyllama_queued_sequences") == 1, 5)
    status, headers, body = post(server, "/v1/completions", LONG)
    assert status == 503 and headers["retry-after"] == "1" and body["error"]["code"] == "queue_full"
    running.close()  # the client goes away: its sequence is cancelled at the next step
    t0 = time.monotonic()
    assert wait_for(lambda: metric(server, "babyllama_running_sequences") == 1
                    and metric(server, "babyllama_queued_sequences") == 0, 1.0)  # the queued one got the slot
    assert b"data: " in read_until(queued, b"data: {")
    queued.close()
    assert wait_for(lambda: metric(server, "babyllama_running_sequences") == 0, 1.0)
    assert time.monotonic() - t0 < 2.0
    # both sequences stopped long before their 900 tokens
    assert metric(server, "babyllama_generation_tokens_total") - generated < 900
    status, _, body = post(server, "/v1/completions", {"prompt": "the", "max_tokens": 3})
    assert status == 200


def test_non_streaming_request_is_cancelled_when_its_client_leaves(server):
    body = dict(LONG, stream=False)
    sock = open_stream(server, body)
    assert wait_for(lambda: metric(server, "babyllama_running_sequences") == 1, 5)
    sock.close()
    assert wait_for(lambda: metric(server, "babyllama_running_sequences") == 0, 1.0)


# ---------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_ends_streams_and_releases_the_port(slow_model):
    server = ServerProcess(babyllama_serve(str(slow_model), "--port", "0")).start()
    try:
        sock = open_stream(server, LONG, headers={})
        got = read_until(sock, b"data: {")
        assert b"data: " in got
        server.proc.send_signal(signal.SIGINT)
        got += read_until(sock, b"data: [DONE]")
        sock.close()
        assert b'"code":"shutdown"' in got and b"data: [DONE]" in got
        status = server.proc.wait(15)
    finally:
        server.stop()
    assert status == 0  # Ctrl-C is how a server is stopped: a clean exit
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:  # the port is free again: a new server can listen on it (as ours does, with
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # SO_REUSEADDR: closed connections linger)
        s.bind((host, int(port)))
        s.listen()
