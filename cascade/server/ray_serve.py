"""`cascade serve --ray`: the server's page and HTTP APIs in front of a Ray Serve deployment (issue 17).

The HTTP layer (app.py) runs here, unchanged, over `RayExecutor`; each replica of the `Painter` deployment
holds one `Engine` (the served models, loaded once in the replica) and streams a job's progress and images
back. Ray Serve's router spreads jobs over the replicas, one job per replica at a time, and queues the rest.
Requests are not combined with `@serve.batch`: one batched call draws different pixels than the same
recipes run one by one (1 in 255 in a few pixels), and the same recipe must give the same image on every
path (measured in the README's Ray section)."""
from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
import time
from collections import Counter, OrderedDict

from ..recipe import RecipeError
from .executor import KEEP, Job


class Painter:
    """A Ray Serve replica: the served models in one Engine, one job at a time."""

    def __init__(self, models: list[str], dtype: str | None, device: str | None, threads: int):
        import torch

        from .engine import Engine

        torch.set_num_threads(threads)
        self.engine = Engine(models, dtype, device)
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def served(self) -> dict:
        return self.engine.served

    async def make(self, recipe, images: dict):
        """The job as a stream: first the recipe as it will run (or what is wrong with it, before any model
        runs), then one message per step with the images finished since the last one. Errors travel as
        messages: exceptions with their own constructors do not survive Ray's pickling."""
        try:
            prepared = await asyncio.to_thread(self.engine.prepare, recipe, images)
        except RecipeError as error:
            yield {"error": "recipe", "field": error.field, "message": str(error).split(": ", 1)[-1]}
            return
        except FileNotFoundError as error:
            yield {"error": "missing", "message": str(error)}
            return
        job = Job("-", prepared.recipe, prepared, steps=self.engine.steps(prepared))
        yield {"replica": self.name, "recipe": job.recipe, "steps": job.steps}
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job.listen(lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        work = asyncio.ensure_future(asyncio.to_thread(self.engine.run, job))
        work.add_done_callback(lambda done: events.put_nowait(None))
        sent = 0
        try:
            while (event := await events.get()) is not None:
                yield {"stage": event["stage"], "step": event["step"], "results": job.results[sent:]}
                sent = len(job.results)
            await work
        except Exception as error:  # a failure inside a model fails this job; the replica goes on
            yield {"error": "failed", "message": f"{type(error).__name__}: {error}",
                   "status": getattr(error, "status", 500)}
        finally:
            job.cancel_event.set()  # a cancelled stream stops the pipeline at its next step
            work.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen: not logged


class RayExecutor:
    """The executor interface of app.py (`served`, `running`, `submit`, `job`, `cancel`, `waiting`) over a
    handle to the Painter deployment; jobs are followed here, so progress, results and cancelling work for
    the page and the APIs as with the local executor."""

    def __init__(self, handle, on_close=None):
        self.handle, self.on_close = handle.options(stream=True), on_close
        self.served = handle.served.remote().result()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.streams: dict[str, object] = {}
        self.replicas: Counter = Counter()  # jobs started per replica
        self.ids, self.lock, self.queued = itertools.count(1), threading.Lock(), 0

    @property
    def running(self) -> Job | None:
        with self.lock:
            return next((j for j in reversed(self.jobs.values()) if j.status == "running"), None)

    def submit(self, recipe, images: dict | None = None) -> Job:
        """Send a job to the replicas and wait until one takes it and has checked it; a recipe the model
        cannot run raises a RecipeError naming the field, as with the local executor."""
        with self.lock:
            self.queued += 1
        try:
            stream = self.handle.make.remote(recipe, images or {})
            first = next(stream)
        finally:
            with self.lock:
                self.queued -= 1
        if first.get("error") == "recipe":
            raise RecipeError(first["field"], first["message"])
        if first.get("error") == "missing":
            raise FileNotFoundError(first["message"])
        job = Job(f"{next(self.ids)}-{os.urandom(4).hex()}", first["recipe"], steps=first["steps"],
                  status="running", started=time.time())
        with self.lock:
            self.jobs[job.id], self.streams[job.id] = job, stream
            self.replicas[first["replica"]] += 1
            for key in [k for k, j in self.jobs.items() if j.done][: max(len(self.jobs) - KEEP, 0)]:
                del self.jobs[key]
        threading.Thread(target=self.follow, args=(job, stream), daemon=True).start()
        return job

    def follow(self, job: Job, stream) -> None:
        """The job's messages as they come: progress, images, and how it ended."""
        from ray.serve.exceptions import RequestCancelledError

        status, error, code = "done", None, 500
        try:
            for event in stream:
                if "error" in event:
                    status, error, code = "failed", event["message"], event["status"]
                    break
                job.stage, job.step = event["stage"], event["step"]
                job.results.extend(event["results"])
                job.notify()
        except RequestCancelledError:
            status = "cancelled"
        except Exception as failure:  # the replica died: this job fails, the others go on
            status, error = "failed", f"{type(failure).__name__}: {failure}"
        self.streams.pop(job.id, None)
        job.status, job.error, job.error_status, job.finished = status, error, code, time.time()
        job.notify()

    def job(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str | None = None) -> Job | None:
        """Cancel a job; None cancels every running job (AUTOMATIC1111's interrupt: stop what is running)."""
        with self.lock:
            chosen = [j for j in self.jobs.values() if not j.done] if job_id is None else \
                [j for j in [self.jobs.get(job_id)] if j is not None]
        for job in chosen:
            job.cancel_event.set()
            stream = self.streams.get(job.id)
            if stream is not None:
                stream.cancel()
        return chosen[-1] if chosen else None

    def waiting(self) -> int:
        return self.queued

    def close(self) -> None:
        self.cancel(None)
        if self.on_close is not None:
            self.on_close()


def add_arguments(p):
    """`cascade serve`'s options for Ray Serve (added to its parser; nothing here imports Ray)."""
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="serve from Ray Serve replicas on the cluster at ADDRESS (a local one without it); "
                   "needs the ray extra")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas, one pipeline each (--ray)")
    p.add_argument("--min-replicas", type=int, metavar="N", help="autoscale from N replicas (--ray)")
    p.add_argument("--max-replicas", type=int, metavar="N", help="autoscale up to N replicas (--ray)")
    p.add_argument("--cpus-per-replica", type=float, default=1, metavar="C",
                   help="CPUs (and torch threads) per replica (--ray; default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0, metavar="G",
                   help="GPUs per replica (--ray; default 0; with GPUs the device defaults to cuda)")
    return p


def deployment_options(args) -> dict:
    """Replicas (a fixed number, or autoscaling between --min-replicas and --max-replicas) and each one's
    CPUs and GPUs, checked before anything starts."""
    cpus, gpus = args.cpus_per_replica, args.gpus_per_replica
    if not cpus > 0 or not gpus >= 0:
        raise ValueError(f"--cpus-per-replica / --gpus-per-replica: expected CPUs > 0 and GPUs >= 0, got "
                         f"{cpus} / {gpus}")
    options = {"max_ongoing_requests": 1, "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if args.min_replicas is None and args.max_replicas is None:
        if args.replicas < 1:
            raise ValueError(f"--replicas: expected a positive integer, got {args.replicas}")
        return {**options, "num_replicas": args.replicas}
    low, high = args.min_replicas or 1, args.max_replicas or max(args.min_replicas, args.replicas)
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"--min-replicas {low} / --max-replicas {high}: expected 0 <= min <= max, max >= 1")
    scaling = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
               "target_ongoing_requests": 1}
    return {**options, "autoscaling_config": scaling}


def build(args, limits):
    """(the ASGI app, its RayExecutor): the Painter deployment started on the cluster `args.ray` names ("":
    a local one), every replica with the models loaded."""
    from ray import serve

    from ..ray_jobs import connect
    from .app import create_app

    options = deployment_options(args)
    connected = connect(args.ray or None)
    serve.start(proxy_location="Disabled")  # HTTP is served by app.py here, not by Serve's proxy
    device = args.device or ("cuda" if args.gpus_per_replica else None)
    threads = max(1, math.ceil(args.cpus_per_replica))
    deployment = serve.deployment(Painter, name="Painter").options(**options)
    handle = serve.run(deployment.bind(args.models, args.dtype, device, threads), name="cascade",
                       route_prefix=None)

    def close():
        serve.delete("cascade")
        if connected:
            import ray

            serve.shutdown()
            ray.shutdown()

    executor = RayExecutor(handle, close)
    return create_app(executor, args.api_key, limits), executor
