"""`cascade batch --ray`: the batch job on a Ray cluster, a thin wrapper over the job layer (issue 17).

The lines become a Ray Data dataset; `map_batches` hands them, one at a time, to a pool of actors, each of
which loads its pipelines once (from the model path, never a pickled model) and runs `batch.run_line`, the
local batch's own function: the PNGs are written by the actors, under the same names, with the same bytes
and metadata as a local run, and a line already done is skipped. Ray Data restarts a killed actor and
retries its in-flight lines; a line it had finished is found done and skipped, and writes are atomic
renames, so nothing is lost or written twice. Only `cascade batch --ray` imports this module (and Ray).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

EXTRA = "--ray needs Ray (Ray Data, Ray Serve): pip install 'cascade-diffusion[ray]'"
# Lines per dataset block: one block is one actor task, retried whole if its actor dies (its finished lines
# are then found done), so small blocks keep a retry cheap; past this many lines blocks grow instead.
MAX_BLOCKS = 4096


def require_ray():
    """Ray, or a one-line error saying how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RuntimeError(EXTRA) from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ("auto": the one this machine belongs to), or start a local one when
    there is none; reuse a connection the caller already made. True if this call connected."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return True


def quiet_data():
    """Ray Data without its own progress bars and execution banners: the batch shows one bar."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False


class LineActor:
    """One actor of the pool: a pipeline cache of its own, warmed with the batch's default model, and the
    local batch's per-line function. Rows in and out are JSON text, so no model or tensor is pickled."""

    def __init__(self, defaults: dict, out: str, root: str, threads: int, device: str | None):
        import torch

        from .jobs import Models

        torch.set_num_threads(threads)
        self.defaults = {**defaults, **({"device": device} if device and "device" not in defaults else {})}
        self.out, self.root, self.models = Path(out), Path(root), Models()
        self.worker = {"pid": os.getpid(), "started": time.time(), "load_seconds": self.warm()}

    def warm(self) -> float | None:
        """Load the default model's text-to-image pipeline now, so the pool is ready when it is loaded; a
        model that has no such pipeline loads with its first line instead."""
        from .jobs import Recipe, prepare

        if "model" not in self.defaults:
            return None
        start = time.perf_counter()
        try:
            prepare(Recipe.from_dict({"prompt": "", "task": "text2img"}, self.defaults), self.models)
        except Exception:  # the lines' own run reports what is wrong with them
            return None
        return round(time.perf_counter() - start, 3)

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        from .batch import Line, run_line

        records = []
        for text in rows["line"]:
            line = Line(**json.loads(text))
            record = run_line(line, self.defaults, self.out, self.models, self.root)
            records.append(json.dumps({**record, "worker": self.worker}))
        return {"record": np.array(records, dtype=object)}


def dataset(lines: list):
    import ray.data

    rows = [{"line": json.dumps(asdict(line))} for line in lines]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), MAX_BLOCKS)))


def run_batch(lines: list, defaults: dict, out: Path, root: Path, args) -> list[dict]:
    """The batch on the cluster `args.ray` names ("" for a local one) with `args.actors` actors of
    `args.cpus_per_actor` CPUs (and torch threads) and `args.gpus_per_actor` GPUs each; the records of
    `batch.run_line`, in line order, each with the `worker` that ran it (pid, start, model load seconds)."""
    actors, cpus, gpus = check_resources(args)
    ray = require_ray()
    # Ray prints its cluster messages (a retried task, a restarted actor) on stdout, where --json goes.
    with contextlib.redirect_stdout(sys.stderr):
        connected = connect(args.ray or None)
        try:
            records = run_lines(lines, defaults, out, root, args, (actors, cpus, gpus))
        finally:
            if connected:
                ray.shutdown()
    return sorted(records, key=lambda r: r["line"])


def run_lines(lines: list, defaults: dict, out: Path, root: Path, args, resources) -> list[dict]:
    import ray.data
    from tqdm.auto import tqdm

    from .batch import planned

    actors, cpus, gpus = resources
    quiet_data()
    made = dataset(lines).map_batches(
        LineActor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus, num_gpus=gpus or None,
        fn_constructor_kwargs=dict(defaults=defaults, out=str(out.resolve()), root=str(root.resolve()),
                                   threads=max(1, math.ceil(cpus)), device="cuda" if gpus else None))
    bar = tqdm(total=sum(planned(line, defaults) for line in lines), unit="image", file=sys.stderr,
               disable=args.quiet, desc=f"batch on {actors} Ray actor{'s' * (actors > 1)}")
    records, lines_by_number = [], {line.number: line for line in lines}
    for row in made.iter_rows():
        records.append(json.loads(row["record"]))
        left = planned(lines_by_number[records[-1]["line"]], defaults)
        if records[-1]["status"] == "skipped":  # as the local bar: done lines leave the total
            bar.total -= left
            bar.refresh()
        else:
            bar.update(left)
    bar.close()
    return records


def check_resources(args) -> tuple[int, float, float]:
    """(actors, CPUs, GPUs per actor), checked before anything starts."""
    actors, cpus, gpus = args.actors, args.cpus_per_actor, args.gpus_per_actor
    if not isinstance(actors, int) or actors < 1:
        raise ValueError(f"--actors: expected a positive integer, got {actors!r}")
    if not cpus > 0:
        raise ValueError(f"--cpus-per-actor: expected a positive number, got {cpus!r}")
    if not gpus >= 0:
        raise ValueError(f"--gpus-per-actor: expected 0 or a positive number, got {gpus!r}")
    return actors, float(cpus), float(gpus)
