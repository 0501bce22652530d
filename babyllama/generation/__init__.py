"""Generation over the engine: run.c's generate loop (loop.py) and chat loop (chat.py) as Python
generators, many sequences at once (batch.py: continuous batching) and speculative decoding
(speculative.py). The CLI and the server only consume these; all of run.c's rules about forced
prompt tokens, stopping and step counting live here, once."""

from .batch import Event, Sampling, Scheduler, Sequence
from .chat import Chat
from .loop import Piece, generate_ids, pieces, resolve_steps, text_of

__all__ = ["Chat", "Event", "Piece", "Sampling", "Scheduler", "Sequence", "generate_ids", "pieces", "resolve_steps",
           "text_of"]
