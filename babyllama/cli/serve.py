"""`babyllama serve`: the OpenAI-compatible server (babyllama/serve) from the command line: the
model and tokenizer as `babyllama run` takes them, where to listen, how many sequences at once."""

from __future__ import annotations

import ipaddress
import sys

from ..errors import BabyLlamaError
from . import EXTRAS, OneLineParser, missing_extra, number


def serve_parser() -> OneLineParser:
    p = OneLineParser(prog="babyllama serve",
                      description="Serve a model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions) "
                                  "with continuous batching, and a chat page at /.")
    p.add_argument("model", nargs="?", help="model .bin (default: the small model bundled with babyllama)")
    p.add_argument("-z", dest="tokenizer", help="tokenizer.bin (default: beside the model, then ./tokenizer.bin)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, "--port", 0, 65535), default=8000, help="port (default 8000; 0 = any)")
    p.add_argument("--max-sequences", type=number(int, "--max-sequences", 1, 4096), default=32,
                   help="sequences generated at once (KV cache slots; default 32)")
    p.add_argument("--max-queue", type=number(int, "--max-queue", 0), default=64,
                   help="sequences that may wait for a slot; beyond that requests get 503 (default 64)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                        "(default: $BABYLLAMA_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the file's stem)")
    p.add_argument("--chat-template", choices=["llama2", "chatml"], default=None,
                   help="chat template (default: the tokenizer's own; Llama 2's [INST] for tokenizer.bin)")
    p.add_argument("--max-body", type=number(int, "--max-body", 1024), default=1 << 20,
                   help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--threads", type=number(int, "--threads", 1), default=None,
                   help="engine worker threads (default: all cores)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    return p


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    try:
        from ..serve.app import create_app, default_api_key, listen, model_name, run, url_of, warn
    except ModuleNotFoundError as e:
        if e.name in EXTRAS:
            raise missing_extra(e.name, "serve") from None
        raise
    from ..api import Model
    from ..tokenizers.chat import TEMPLATES
    from .run import set_threads

    set_threads(args.threads)
    api_key = args.api_key if args.api_key is not None else default_api_key()
    if api_key is not None and not api_key.strip():
        raise BabyLlamaError("--api-key must not be empty")
    model = Model.load(args.model, args.tokenizer)  # file errors end here, as one line, before listening
    name = args.model_name or model_name(args.model)
    template = TEMPLATES[args.chat_template] if args.chat_template else None
    sock = listen(args.host, args.port)
    if not _loopback(args.host) and api_key is None:
        warn(f"babyllama serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
             "machine can use the model")
    app = create_app(model, name, template, api_key, args.max_sequences, args.max_queue, args.max_body, log=warn)
    url = url_of(sock)

    def started():
        print(f"babyllama serve: {name} at {url}  (chat page: {url}/, API: {url}/v1; Ctrl-C stops)", flush=True)

    try:
        run(app, sock, args.access_log, on_start=started)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    print("babyllama serve: stopped", file=sys.stderr, flush=True)
    return 0
