"""The HTTP application: OpenAI's endpoints on Starlette, each request turned into scheduler jobs
and its events into OpenAI's JSON or server-sent events.

    app = create_app(babyllama.load(), name="stories")      # any ASGI server runs it
    run(app, "127.0.0.1", 8000)                             # uvicorn, with a clean Ctrl-C

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}], GET /health,
GET /metrics, POST /tokenize, POST /detokenize, and the chat page at GET /. Every failure is
OpenAI's error body with a 4xx status (a 5xx only if the engine itself fails); no request can stop
the server. Generation is the scheduler thread's (worker.py); here we only check, submit, relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import socket
import sys
import time
import traceback
import uuid
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..errors import BabyLlamaError
from ..sampling import LogitsProcessor, Sampler
from .choice import ChoiceText
from .metrics import CONTENT_TYPE, Metrics
from .schemas import (APIError, Params, chat_request, check_model, completion_request, detokenize_request, invalid,
                      tokenize_request)
from .worker import Failure, Job, Worker

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 1 << 20  # bytes of a request body; a full context of text is a few KB
RETRY_AFTER = "1"  # seconds a client should wait after a 503 (queue full, model loading)
FINGERPRINT = f"babyllama-{__version__}"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat's: the rest of the context)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Service:
    """One served model: its worker thread, the admission count, settings and metrics."""

    def __init__(self, model, name: str, chat_template=None, api_key: str | None = None, max_sequences: int = 32,
                 max_queue: int = 64, max_body: int = MAX_BODY, max_rows: int = 256, log=None):
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = model.config
        self.name = name
        self.template = chat_template if chat_template is not None else model.tokenizer.chat_template
        self.api_key = api_key
        self.max_body = max_body
        self.capacity = max_sequences + max_queue  # jobs running or waiting; beyond: 503
        self.active = 0  # jobs admitted and not yet over (touched on the event loop only)
        self.closing = False
        self.created = int(time.time())
        self.metrics = Metrics()
        self.worker = Worker(model, self.metrics, max_sequences, max_rows, log)

    # ---------------------------------------------------------------------------- checks

    def authorize(self, request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_ready(self) -> None:
        if self.closing:
            raise APIError(503, "the server is shutting down", "server_error", headers={"Retry-After": RETRY_AFTER})
        if self.worker.status == "failed":
            raise APIError(503, f"the engine failed to start: {self.worker.error}", "server_error")
        if not self.worker.ready:
            raise APIError(503, "the model is still loading (compiling the engine); retry shortly", "server_error",
                           code="model_loading", headers={"Retry-After": RETRY_AFTER})

    def too_long(self, chars: int) -> bool:
        """True when a text of `chars` characters cannot fit the context whatever its tokens: a
        token covers at most max_token_length bytes and a character at least one byte. Checked
        before encoding, as tokenizer.bin's Python BPE would hold the event loop for seconds on a
        megabyte of text (vocabularies without max_token_length encode in native code: no check)."""
        longest = getattr(self.tokenizer, "max_token_length", None)
        return bool(longest) and chars > longest * (self.config.seq_len + 1)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """A text's token ids (a text that cannot fit the context is refused unencoded)."""
        if self.too_long(len(text)):
            raise invalid("prompt", f"the prompt is far longer than the model's context of {self.config.seq_len} "
                                    "tokens", code="context_length_exceeded")
        return self.tokenizer.encode(text, bos=bos)

    def steps_for(self, n_prompt: int, max_tokens: int | None, default: int | None, param: str) -> int:
        """run.c's -n for a prompt and max_tokens: positions, prompt included. The last sampled
        token takes no position, so a prompt of P tokens leaves room for seq_len + 1 - P. An
        explicit max_tokens beyond that is refused; the default (None: the room) is capped by it."""
        seq_len = self.config.seq_len
        if n_prompt > seq_len:
            raise invalid("prompt", f"the prompt is {n_prompt} tokens, longer than the model's context of {seq_len}",
                          code="context_length_exceeded")
        room = seq_len + 1 - n_prompt
        if max_tokens is None:
            max_tokens = room if default is None else min(default, room)
        elif max_tokens > room:
            raise invalid(param, f"the prompt ({n_prompt} tokens) plus {param} ({max_tokens}) is beyond the model's "
                                 f"context of {seq_len}: at most {room} tokens can follow this prompt",
                          code="context_length_exceeded")
        return n_prompt - 1 + max_tokens

    # ---------------------------------------------------------------------------- jobs

    def check_capacity(self, total: int) -> None:
        """Room for `total` more sequences (running + queued), else 400 (never) or 503 (not now)."""
        if total > self.capacity:
            raise invalid("n", f"this request needs {total} sequences; this server runs at most {self.capacity} "
                               "at once (running + queued)")
        if self.active + total > self.capacity:
            raise APIError(503, f"the server is busy: {self.active} sequences are running or queued (the limit is "
                                f"{self.capacity}); retry shortly", "server_error", code="queue_full",
                           headers={"Retry-After": RETRY_AFTER})

    def jobs(self, prompts: list[list[int]], params: Params, stop_ids, chat: bool, param: str,
             default_max_tokens: int | None = None) -> list[Job]:
        """One job per (prompt, choice), OpenAI's order: choice index = prompt * n + j; choice i
        is seeded seed + i (as generate_batch seeds prompt i). Admission is checked here."""
        total = len(prompts) * params.n
        self.check_capacity(total)
        steps = [self.steps_for(len(p), params.max_tokens, default_max_tokens, param) for p in prompts]
        base = params.seed if params.seed else secrets.randbits(64)  # no seed (or 0, run.c's "none"): random
        vocab = self.config.vocab_size
        out = []
        sink: asyncio.Queue = asyncio.Queue()
        for i in range(total):
            prompt = prompts[i // params.n]
            sampler = Sampler(vocab, temperature=params.temperature, topp=params.top_p, seed=(base + i) % 2**64 or 1,
                              topk=params.top_k, minp=params.min_p)
            if chat:  # run.c's chat loop draws (and discards) a coin at every forced prompt position
                sampler.skip(len(prompt) - 1)
            processor = LogitsProcessor(vocab, params.logit_bias, params.presence_penalty, params.frequency_penalty)
            out.append(Job(i, prompt, steps[i // params.n], sampler, tuple(stop_ids), sink,
                           processor if processor.active else None, params.logprobs))
        self.active += total
        return out

    def release(self, jobs: list[Job]) -> None:
        self.active -= len(jobs)


# ---------------------------------------------------------------------------- responses


class Renderer:
    """OpenAI's shapes for one endpoint: stream chunks, the final body, logprobs."""

    object_stream: str
    object_whole: str
    prefix: str

    def __init__(self, service: Service, params: Params):
        self.model = service.name
        self.params = params
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def chunk(self, choices: list[dict]) -> dict:
        out = self.head(self.object_stream)
        out["choices"] = choices
        if self.params.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return out

    def usage_chunk(self, usage: dict) -> dict:
        out = self.head(self.object_stream)
        out["choices"] = []
        out["usage"] = usage
        return out

    def whole(self, choices: list[dict], usage: dict) -> dict:
        out = self.head(self.object_whole)
        out["choices"] = choices
        out["usage"] = usage
        return out

    def opening(self, n: int) -> list[dict]:
        """Chunks sent before any token (chat: the role)."""
        return []


class CompletionRenderer(Renderer):
    object_stream = object_whole = "text_completion"
    prefix = "cmpl"

    def delta(self, index, text, entries, finish, offset) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(entries, offset), "finish_reason": finish}

    def choice(self, index, text, entries, finish) -> dict:
        return self.delta(index, text, entries, finish, 0)

    def logprobs(self, entries, offset: int):
        """The legacy completions shape: parallel lists, text_offset into the choice's text."""
        if self.params.logprobs is None:
            return None
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries], "text_offset": offsets}


class ChatRenderer(Renderer):
    object_stream = "chat.completion.chunk"
    object_whole = "chat.completion"
    prefix = "chatcmpl"

    def opening(self, n: int) -> list[dict]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(n)]

    def delta(self, index, text, entries, finish, offset) -> dict:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": self.logprobs(entries),
                "finish_reason": finish}

    def choice(self, index, text, entries, finish) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(entries), "finish_reason": finish}

    def logprobs(self, entries):
        if self.params.logprobs is None:
            return None
        return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                             "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in e.top]}
                            for e in entries]}


class GenerationResponse(Response):
    """Runs a request's jobs and answers: whole (JSON) or streamed (server-sent events). The client's
    disconnect is watched the whole time: its jobs are cancelled at once, so their slots are free
    before the scheduler's next step."""

    def __init__(self, service: Service, jobs: list[Job], params: Params, render: Renderer, choices: list[ChoiceText],
                 prompt_tokens: int, arrived: float):
        self.service, self.jobs, self.params, self.render = service, jobs, params, render
        self.choices = choices
        self.prompt_tokens = prompt_tokens
        self.arrived = arrived
        self.background = None
        self.status_code = 200
        self._last: dict[int, float] = {}  # job index -> time of its last token (inter-token latency)
        self._offsets = [len(c.echo_text) for c in choices]

    async def __call__(self, scope, receive, send) -> None:
        service = self.service
        service.worker.submit(self.jobs)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, receive, tg.cancel_scope)
                if self.params.stream:
                    await self._stream(send)
                else:
                    await self._whole(send)
                tg.cancel_scope.cancel()
        finally:
            unfinished = [j for j in self.jobs if not self.choices[j.index].done and not j.cancelled]
            if unfinished:
                service.worker.cancel(unfinished)
            service.release(self.jobs)
            service.metrics.e2e.observe(time.perf_counter() - self.arrived)

    async def _watch(self, receive, scope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.service.worker.cancel([j for j in self.jobs if not self.choices[j.index].done])
        scope.cancel()

    def _feed(self, job: Job, event) -> str:
        """A token event into its choice; returns the text to send."""
        choice = self.choices[job.index]
        if choice.done:  # sampled after a stop string, before the cancel took effect
            return ""
        now = time.perf_counter()
        m = self.service.metrics
        last = self._last.get(job.index)
        if last is None:
            m.ttft.observe(now - self.arrived)
        else:
            m.itl.observe(now - last)
        self._last[job.index] = now
        text = choice.feed(event.token, event.finished, event.logprob, event.top_logprobs)
        m.generation_tokens.inc()
        if choice.done and not event.finished:  # a stop string: the sequence is still running
            self.service.worker.cancel([job])
        return text

    def _usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    async def _items(self):
        """(job, item) pairs as they arrive, several at a time when they are already waiting."""
        sink = self.jobs[0].sink
        while True:
            items = [await sink.get()]
            while not sink.empty():
                items.append(sink.get_nowait())
            yield items

    async def _whole(self, send) -> None:
        texts = [c.echo_text for c in self.choices]
        entries = [[] for _ in self.choices]
        async for items in self._items():
            for job, item in items:
                if isinstance(item, Failure):
                    e = APIError(item.status, item.message, item.type, code=item.code)
                    return await self._send_json(send, e.body(), e.status)
                texts[job.index] += self._feed(job, item)
                entries[job.index] += self.choices[job.index].take_entries()
            if all(c.done for c in self.choices):
                break
        render = self.render
        choices = [render.choice(i, texts[i], entries[i], c.finish_reason) for i, c in enumerate(self.choices)]
        await self._send_json(send, render.whole(choices, self._usage()), 200)

    async def _send_json(self, send, body: dict, status: int) -> None:
        data = _json(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _stream(self, send) -> None:
        render = self.render
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")] + \
                  [(k.encode(), v.encode()) for k, v in SSE_HEADERS.items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        opening = render.opening(len(self.choices))  # chat: the role; echo: the prompt's text
        opening += [render.chunk([render.delta(i, c.echo_text, [], None, 0)])
                    for i, c in enumerate(self.choices) if c.echo_text]
        await self._send_events(send, opening)
        async for items in self._items():
            events = []
            for job, item in items:
                if isinstance(item, Failure):
                    events.append({"error": APIError(item.status, item.message, item.type, code=item.code).body()["error"]})
                    await self._send_events(send, events, done=True)
                    return
                choice = self.choices[job.index]
                if choice.done:
                    continue
                text = self._feed(job, item)
                logprobs = choice.take_entries()
                if text or logprobs or choice.done:
                    events.append(render.chunk([render.delta(job.index, text, logprobs, choice.finish_reason,
                                                             self._offsets[job.index])]))
                    self._offsets[job.index] += len(text)
            finished = all(c.done for c in self.choices)
            if finished and self.params.include_usage:
                events.append(render.usage_chunk(self._usage()))
            await self._send_events(send, events, done=finished)
            if finished:
                return

    @staticmethod
    async def _send_events(send, events: list[dict], done: bool = False) -> None:
        data = b"".join(b"data: " + _json(e) + b"\n\n" for e in events)
        if done:
            data += b"data: [DONE]\n\n"
        if data or done:
            await send({"type": "http.response.body", "body": data, "more_body": not done})


# ---------------------------------------------------------------------------- endpoints


async def read_json(request, limit: int) -> dict:
    """The request body as a JSON object: at most `limit` bytes of UTF-8 JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(None, f"the request body is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise invalid(None, "the request body is empty: expected a JSON object")
    try:
        body = json.loads(text)
    except RecursionError:
        raise invalid(None, "the request body is nested too deeply") from None
    except ValueError as e:
        raise invalid(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def create_app(model, name: str | None = None, chat_template=None, api_key: str | None = None,
               max_sequences: int = 32, max_queue: int = 64, max_body: int = MAX_BODY, log=None) -> Starlette:
    """The ASGI app serving `model` (an api.Model). The scheduler thread starts (and compiles the
    engine) with the app's lifespan; /health is 503 until it is ready."""
    svc = Service(model, name or "babyllama", chat_template, api_key, max_sequences, max_queue, max_body, log=log)

    def endpoint(fn, auth: bool = True):
        """Every request's errors become OpenAI's body; nothing escapes to the server as a 500."""

        async def handler(request):
            try:
                if auth:
                    svc.authorize(request)
                return await fn(request)
            except APIError as e:
                return error_response(e)
            except BabyLlamaError as e:  # prompts the tokenizer or the scheduler refused
                return error_response(invalid(None, str(e)))
            except Exception as e:  # a bug: say so, keep serving
                traceback.print_exc()
                return error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

        handler.__name__ = fn.__name__
        return handler

    async def generation(request, chat: bool):
        """/v1/completions and /v1/chat/completions: check, make the jobs, answer as they run."""
        arrived = time.perf_counter()
        body = await read_json(request, svc.max_body)
        check_model(body, svc.name)
        tok = svc.tokenizer
        if chat:
            messages, params = chat_request(body, svc.config.vocab_size)
            svc.check_ready()
            prompts = [conversation_ids(messages)]
            param = "max_completion_tokens" if body.get("max_tokens") is None and body.get("max_completion_tokens") \
                else "max_tokens"
            jobs = svc.jobs(prompts, params, tok.eos_ids, chat=True, param=param)
            stops = params.stop + ((svc.template.stop_text,) if svc.template.stop_text else ())
            render = ChatRenderer(svc, params)
        else:
            texts, params = completion_request(body, svc.config.vocab_size)
            svc.check_ready()
            svc.check_capacity(len(texts) * params.n)  # before encoding what could never run
            prompts = [svc.encode(p) if isinstance(p, str) else p for p in texts]
            jobs = svc.jobs(prompts, params, tok.stop_ids, chat=False, param="max_tokens",
                            default_max_tokens=COMPLETION_MAX_TOKENS)
            stops = params.stop
            render = CompletionRenderer(svc, params)
        choices = [ChoiceText(tok, j.prompt, stops, j.stop_ids, params.logprobs is not None, params.echo)
                   for j in jobs]
        n_prompt = sum(map(len, prompts))  # each prompt once, however many choices (OpenAI's usage)
        svc.metrics.prompt_tokens.inc(n_prompt)
        return GenerationResponse(svc, jobs, params, render, choices, n_prompt, arrived)

    async def completions(request):
        return await generation(request, chat=False)

    async def chat_completions(request):
        return await generation(request, chat=True)

    def conversation_ids(messages: list[dict]) -> list[int]:
        if svc.template is None:
            raise invalid("messages", "this model has no chat template: start the server with --chat-template "
                                      "llama2|chatml")
        if svc.too_long(sum(len(m["content"]) for m in messages)):
            raise invalid("messages", f"the conversation is far longer than the model's context of "
                                      f"{svc.config.seq_len} tokens", code="context_length_exceeded")
        return svc.template.conversation(svc.tokenizer, messages, add_generation_prompt=True)

    def model_card() -> dict:
        return {"id": svc.name, "object": "model", "created": svc.created, "owned_by": "babyllama",
                "max_model_len": svc.config.seq_len}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model_info(request):
        if request.path_params["model"] != svc.name:
            raise APIError(404, f"The model '{request.path_params['model'][:100]}' does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(model_card())

    async def tokenize(request):
        body = await read_json(request, svc.max_body)
        check_model(body, svc.name)
        prompt, messages, bos = tokenize_request(body)
        ids = svc.encode(prompt, bos) if messages is None else conversation_ids(messages)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": svc.config.seq_len})

    async def detokenize(request):
        body = await read_json(request, svc.max_body)
        check_model(body, svc.name)
        ids = detokenize_request(body, svc.config.vocab_size)
        return JSONResponse({"prompt": svc.tokenizer.decode(ids)})

    async def health(request):
        status = svc.worker.status
        if svc.closing:
            status = "stopping"
        body = {"status": status, "model": svc.name}
        if svc.worker.error:
            body["error"] = svc.worker.error
        ok = status == "ready"
        return JSONResponse(body, status_code=200 if ok else 503, headers={} if ok else {"Retry-After": RETRY_AFTER})

    async def metrics(request):
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE)

    async def page(request):
        return FileResponse(STATIC / "index.html")

    async def not_found(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.worker.start(asyncio.get_running_loop())
        yield
        await close(svc)

    routes = [
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(model_info), methods=["GET"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
        Route("/health", endpoint(health, auth=False), methods=["GET"]),
        Route("/metrics", endpoint(metrics, auth=False), methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})
    app.state.service = svc
    return CountRequests(app, svc.metrics, {r.path for r in routes if isinstance(r, Route)})


async def close(svc: Service) -> None:
    """Stop taking requests and end every running one (its stream gets an error event, then
    [DONE]); idempotent."""
    if svc.closing:
        return
    svc.closing = True
    await anyio.to_thread.run_sync(svc.worker.stop)


class CountRequests:
    """ASGI middleware: babyllama_requests_total by endpoint and status (unknown paths are
    "other", so a scan of random URLs cannot grow the metrics without bound)."""

    def __init__(self, app: Starlette, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in self.paths else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


# ---------------------------------------------------------------------------- running it


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); refused addresses raise BabyLlamaError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise BabyLlamaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app, sock: socket.socket, access_log: bool = False, on_start=None) -> None:
    """Serve `app` with uvicorn on `sock` until SIGINT/SIGTERM. At the first signal, running
    requests are ended (streams get an error event and [DONE]) and the socket is released."""
    import uvicorn

    svc = app.state.service

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_start is not None and not self.should_exit:
                on_start()

        async def shutdown(self, sockets=None):
            await close(svc)  # first: so open streams end and uvicorn need not wait for them
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level="warning", access_log=access_log, timeout_graceful_shutdown=5,
                            lifespan="on", server_header=False)
    Server(config).run(sockets=[sock])


def model_name(path) -> str:
    """The name /v1/models reports: the file's stem; the bundled model is 'babyllama'."""
    from ..api import DEFAULT_MODEL

    if path is None or Path(path).resolve() == DEFAULT_MODEL.resolve():
        return "babyllama"
    return Path(path).stem


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_api_key() -> str | None:
    return os.environ.get("BABYLLAMA_API_KEY") or None
