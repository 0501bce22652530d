"""The scheduler thread: the one thread that runs the engine, between the event loop's requests and
Scheduler.step().

Jobs (one per choice of a request) and cancellations arrive on a thread-safe queue and are taken
between steps: a request joins the running batch at the next step, and a cancelled sequence has
left before the step after its cancel. Each step's events go back to the event loop in one
call_soon_threadsafe. The engine is not thread-safe, so nothing else calls it; its Numba kernels
release the GIL, so the event loop keeps serving HTTP while a step runs.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from ..errors import BabyLlamaError
from ..generation import Sampling, Scheduler, Sequence
from ..sampling import Sampler


@dataclass(eq=False)
class Job:
    """One choice of a request: its prompt and settings, and the asyncio.Queue its events go to
    (shared by the request's jobs) as (job, Event) or (job, Failure)."""

    index: int
    prompt: list[int]
    steps: int  # positions, prompt included (run.c's -n)
    sampler: Sampler
    stop_ids: tuple
    sink: asyncio.Queue
    processor: object = None
    logprobs: int | None = None
    seq: Sequence | None = None  # set by the scheduler thread
    cancelled: bool = False


@dataclass
class Failure:
    """The end of a job that did not finish by itself: the server stopping, or a failed step."""

    status: int
    message: str
    type: str = "server_error"
    code: str | None = None


class Worker:
    """Owns the Scheduler and runs it in its own thread. submit/cancel/stop may be called from any
    thread; everything else runs in the worker's thread."""

    def __init__(self, model, metrics, max_sequences: int = 32, max_rows: int = 256, log=None):
        self.model = model
        self.metrics = metrics
        self.max_sequences = max_sequences
        self.max_rows = max_rows
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.status = "loading"  # loading -> ready | failed; stopped at the end
        self.error: str | None = None
        self.warmup_seconds: float | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="babyllama-scheduler", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------------------- any thread

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the thread; events are delivered on `loop`."""
        self._loop = loop
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def submit(self, jobs: list[Job]) -> None:
        self._commands.put(("add", jobs))

    def cancel(self, jobs: list[Job]) -> None:
        """Drop these jobs: before the next step if they run, never started if they wait."""
        for job in jobs:
            job.cancelled = True
        self._commands.put(("cancel", jobs))

    def stop(self, timeout: float = 10.0) -> None:
        """End every job with a Failure (503: shutting down) and stop the thread."""
        self._commands.put(("stop", None))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            self._warm_up()
        except Exception as e:  # a bug or a broken model: /health says so; requests get 503
            self.status, self.error = "failed", f"{type(e).__name__}: {e}"
            self.log(f"babyllama serve: error: the engine failed to start: {self.error}")
            traceback.print_exc()
            self._drain_failed()
            return
        self.status = "ready"
        self.metrics.ready.set(1)
        self._serve()

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.model.engine, max_sequences=self.max_sequences, max_rows=self.max_rows)

    def _warm_up(self) -> None:
        """Compile (or load from the cache) every piece of code a request runs, before /health says
        ready: a prefill of several rows, decode steps, sampling with and without temperature."""
        engine = self.model.engine
        if engine.compiles_on_first_call:
            self.log("babyllama serve: compiling the engine for this machine (first run only, ~20-30 s); "
                     "/health answers 503 until it is ready")
        t0 = time.perf_counter()
        sched = self._new_scheduler()
        bos = self.model.tokenizer.bos_id or 0
        for temperature in (0.0, 1.0):
            sched.add([bos] * 3, 5, Sampling(temperature=temperature, seed=1), stop_ids=())
        sched.run_all()
        self.warmup_seconds = time.perf_counter() - t0

    def _take(self, block: bool) -> list:
        out = [self._commands.get()] if block else []
        while True:
            try:
                out.append(self._commands.get_nowait())
            except queue.Empty:
                return out

    def _serve(self) -> None:
        sched = self._new_scheduler()
        live: dict[Sequence, Job] = {}
        m = self.metrics
        while True:
            for op, jobs in self._take(block=not sched.busy):
                if op == "stop":
                    self._end(list(live.values()), Failure(503, "the server is shutting down", code="shutdown"))
                    self.status = "stopped"
                    self._drain_failed()
                    return
                if op == "add":
                    for job in jobs:
                        if job.cancelled:
                            continue
                        try:
                            job.seq = sched.add(job.prompt, job.steps, job.sampler, job.stop_ids, job.processor,
                                                job.logprobs)
                        except BabyLlamaError as e:  # the app checks first; this is the last line of defence
                            self._end([job], Failure(400, str(e), "invalid_request_error"))
                            continue
                        live[job.seq] = job
                else:  # cancel
                    for job in jobs:
                        if job.seq is not None and live.pop(job.seq, None) is not None:
                            sched.cancel(job.seq)
            if not sched.busy:
                m.running.set(0)
                m.queued.set(0)
                continue
            t0 = time.perf_counter()
            try:
                events = sched.step()
            except Exception as e:  # a bug: fail what ran, keep serving with a fresh scheduler
                self.log(f"babyllama serve: error: a scheduler step failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                self._end(list(live.values()), Failure(500, f"generation failed: {type(e).__name__}: {e}"))
                sched, live = self._new_scheduler(), {}
                continue
            m.step_seconds.observe(time.perf_counter() - t0)
            m.batch_rows.observe(sched.last_rows)
            m.batch_sequences.observe(len(events))
            m.running.set(len(sched.running))
            m.queued.set(len(sched.queue))
            out = []
            for e in events:
                job = live[e.seq]
                out.append((job, e))
                if e.finished:
                    del live[e.seq]
            if out:
                self._deliver(out)

    def _end(self, jobs: list[Job], failure: Failure) -> None:
        if jobs:
            self._deliver([(job, failure) for job in jobs])

    def _drain_failed(self) -> None:
        """After the thread stops serving, answer whatever is still submitted (so no request waits
        forever) until the process ends."""

        def answer():
            while True:
                op, jobs = self._commands.get()
                if op == "add":
                    why = "the server is shutting down" if self.status == "stopped" else \
                        f"the engine failed to start: {self.error}"
                    self._end(jobs, Failure(503, why))

        threading.Thread(target=answer, name="babyllama-scheduler-closed", daemon=True).start()

    def _deliver(self, items: list) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _put_all(items: list) -> None:
    for job, item in items:
        job.sink.put_nowait((job, item))
