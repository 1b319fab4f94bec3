"""How a recipe is executed: a queue of jobs in arrival order and one worker thread that runs them through
the job layer. The HTTP layer sees only `submit(recipe) -> Job`, `job(id)`, `cancel(id)` and `served`, so a
Ray Serve backed executor can stand in for this one."""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

KEEP = 64  # finished jobs kept for their results; older ones are forgotten


class Cancelled(Exception):
    """Raised inside a run when its job was cancelled; the run stops at its next step."""


@dataclass
class Job:
    """One request's work: its recipe, where it stands, and what it made."""
    id: str
    recipe: object  # the cascade.recipe.Recipe as it runs: defaults filled in
    prepared: object = field(default=None, repr=False)  # what the engine runs
    status: str = "queued"  # queued, running, done, failed, cancelled
    stage: str = ""
    step: int = 0  # steps done over all stages and images
    steps: int = 0  # steps in all
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    results: list = field(default_factory=list)  # one dict per image (see engine.result)
    error: str | None = None
    error_status: int = 500
    error_field: str | None = None  # the recipe field a 4xx error is about
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    listeners: list = field(default_factory=list, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def done(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        return min(self.step / self.steps, 1.0) if self.steps else 0.0

    def eta(self) -> float | None:
        """Seconds left, from the time each step has taken so far."""
        if self.started is None or not self.step or not self.steps:
            return None
        spent = (self.finished or time.time()) - self.started
        return max(spent / self.step * (self.steps - self.step), 0.0)

    def event(self) -> dict:
        """The job's state as one progress message (the page's server-sent events, GET /api/jobs/ID)."""
        eta = self.eta()
        return {"id": self.id, "status": self.status, "stage": self.stage, "step": self.step,
                "steps": self.steps, "progress": round(self.progress(), 4),
                "eta": None if eta is None else round(eta, 2), "images": len(self.results),
                "error": self.error}

    def listen(self, callback) -> None:
        """callback(event) on every change, from the worker thread; once at once if the job is over."""
        with self.lock:
            self.listeners.append(callback)
            over = self.done
        if over:
            callback(self.event())

    def unlisten(self, callback) -> None:
        with self.lock:
            if callback in self.listeners:
                self.listeners.remove(callback)

    def notify(self) -> None:
        message = self.event()
        with self.lock:
            listeners = list(self.listeners)
        for callback in listeners:
            callback(message)

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled(self.id)


class LocalExecutor:
    """Jobs run one at a time, in arrival order, in this process; `engine` knows how to run one recipe."""

    def __init__(self, engine):
        self.engine, self.served = engine, engine.served
        self.queue: queue.Queue = queue.Queue()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running: Job | None = None
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self.work, name="cascade-worker", daemon=True)
        self.worker.start()

    def submit(self, recipe, images: dict | None = None) -> Job:
        """Check and queue a recipe (images: its uploaded inputs, in memory); a recipe the model cannot run
        raises a RecipeError naming the field before anything is queued. May load a pipeline: call it off
        the event loop."""
        prepared = self.engine.prepare(recipe, images or {})
        with self.lock:
            job = Job(f"{next(self.ids)}-{os.urandom(4).hex()}", prepared.recipe, prepared)
            job.steps = self.engine.steps(prepared)
            self.jobs[job.id] = job
            self.forget()
            self.queue.put(job)
        return job

    def job(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str | None = None) -> Job | None:
        """Cancel a job (None: the running one); a queued job never starts, a running one stops at its next
        step."""
        job = self.running if job_id is None else self.job(job_id)
        if job is not None and not job.done:
            job.cancel_event.set()
            if job.status == "queued":
                self.finish(job, "cancelled")
        return job

    def waiting(self) -> int:
        return sum(1 for j in list(self.jobs.values()) if j.status == "queued")

    def forget(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.done]
        for key in finished[: max(len(finished) - KEEP, 0)]:
            del self.jobs[key]

    def finish(self, job: Job, status: str, error: str | None = None, error_status: int = 500) -> None:
        job.status, job.error, job.error_status, job.finished = status, error, error_status, time.time()
        job.notify()

    def work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.status != "queued":
                continue
            self.running, job.status, job.started = job, "running", time.time()
            job.notify()
            self.run(job)
            self.running = None

    def run(self, job: Job) -> None:
        try:
            self.engine.run(job)
        except Cancelled:
            self.finish(job, "cancelled")
        except Exception as error:  # a failure inside a model: the job fails, the server goes on
            self.fail(job, error)
        else:
            self.finish(job, "done")

    def fail(self, job: Job, error: Exception) -> None:
        """A pipeline's own argument check (a ValueError or TypeError before its first step) is the request's
        fault: 422 naming the recipe field when the message starts with its name; anything else is 500."""
        field = getattr(error, "field", None)
        if field is None and isinstance(error, (ValueError, TypeError)) and job.step == 0:
            field = self.engine.field_of(str(error))
        if field is not None:
            job.error_field = field
            self.finish(job, "failed", str(error).removeprefix(f"{field}: "), 422)
        else:
            self.finish(job, "failed", f"{type(error).__name__}: {error}", 500)

    def close(self) -> None:
        for job in list(self.jobs.values()):
            self.cancel(job.id)
        self.queue.put(None)
