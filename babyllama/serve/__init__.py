"""`babyllama serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler, and
its chat page. Needs the serve extra (uvicorn, Starlette, prometheus-client).

    from babyllama.serve import create_app
    app = create_app(babyllama.load(), name="babyllama")   # an ASGI app

schemas.py checks requests, choice.py turns tokens into text (stop strings, logprobs), worker.py
is the one thread that runs the engine, app.py the endpoints, metrics.py /metrics, static/ the page;
client.py starts servers and drives them with concurrent streaming clients (the load test and the
benchmark), bench.py is the serve benchmark (bench/serve.sh).
"""

from .app import create_app

__all__ = ["create_app"]
