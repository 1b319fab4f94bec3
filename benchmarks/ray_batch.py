"""Images per minute of `cascade batch` locally and on Ray, and Ray's fixed costs (issue 17).

32 demo-world captions (seeds 0..31) as one JOBS file, run three ways on this machine: the local batch (one
process, 2 torch threads), then on a local Ray cluster with 1 and with 2 actors (1 CPU and 1 thread each).
For each: the wall time with every fixed cost, and the rate once the pipelines are loaded (images over the
time from the first actor ready to the last image). Fixed costs: the cluster start (ray.init), an actor's
start (from the batch's submission to its constructor, torch imported) and its model load (the demo
pipeline built from its folder). The load average is printed before and after: other work on the machine
shares its cores.

    python benchmarks/ray_batch.py [--n 32] [--steps 20] [--prior-steps 10] [--only local,ray1,ray2]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

from cascade import demo_world as dw
from cascade.batch import read_jobs, run_line
from cascade.jobs import Models


def jobs_file(folder: Path, n: int) -> Path:
    path = folder / "jobs.txt"
    path.write_text("".join(f"{caption}\n" for _, caption, _ in itertools.islice(dw.world(20261122), n)))
    return path


def local(jobs: Path, out: Path, defaults: dict, threads: int) -> dict:
    """The local batch's loop (what `cascade batch` runs without --ray), load timed apart."""
    torch.set_num_threads(threads)
    models, lines = Models(), read_jobs(jobs)
    start = time.perf_counter()
    records = [run_line(lines[0], defaults, out, models, jobs.parent)]
    first = time.perf_counter()
    records += [run_line(line, defaults, out, models, jobs.parent) for line in lines[1:]]
    end = time.perf_counter()
    images = sum(r["images"] for r in records)
    steady = 60 * (images - 1) / (end - first)
    return {"wall_s": round(end - start, 2), "images": images,
            "wall_per_min": round(60 * images / (end - start), 1), "steady_per_min": round(steady, 1),
            "first_image_s": round(first - start, 2)}


def on_ray(jobs: Path, out: Path, defaults: dict, actors: int) -> dict:
    from cascade.ray_jobs import run_batch

    args = Namespace(ray="", actors=actors, cpus_per_actor=1, gpus_per_actor=0, quiet=True)
    submitted = time.time()
    records = run_batch(read_jobs(jobs), defaults, out, jobs.parent, args)
    end = time.time()
    workers = {r["worker"]["pid"]: r["worker"] for r in records}.values()
    ready = min(w["started"] + (w["load_seconds"] or 0) for w in workers)
    images = sum(r["images"] for r in records)
    return {"wall_s": round(end - submitted, 2), "images": images,
            "wall_per_min": round(60 * images / (end - submitted), 1),
            "steady_per_min": round(60 * images / (end - ready), 1), "actors_seen": len(workers),
            # Ray's own time per line: the actors' wall time after loading, less the time inside run_line.
            "overhead_per_line_ms": round(1000 * ((end - ready) * len(workers) - sum(r["seconds"] for r in
                                                                                   records)) / len(records)),
            "actor_start_s": sorted(round(w["started"] - submitted, 2) for w in workers),
            "model_load_s": sorted(w["load_seconds"] for w in workers)}


def same_files(a: Path, b: Path) -> str:
    names = sorted(p.name for p in a.glob("*.png"))
    equal = sum((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    return f"{equal}/{len(names)}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prior-steps", type=int, default=10)
    p.add_argument("--only", default="local,ray1,ray2", help="which runs, comma-separated: local (2 "
                   "threads), local1 (1 thread), ray1, ray2 (each under 3 minutes on a quiet 2-core machine)")
    a = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-only cluster
    defaults = {"model": "demo", "steps": a.steps, "prior_steps": a.prior_steps}
    runs = a.only.split(",")
    say = lambda key, value: print(f"{key}: {json.dumps(value)}", flush=True)  # noqa: E731
    say("setup", {"n": a.n, "steps": a.steps, "prior_steps": a.prior_steps, "load": os.getloadavg()})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jobs = jobs_file(root, a.n)
        for threads in [k for k in (2, 1) if ("local" if k == 2 else "local1") in runs]:
            found = local(jobs, root / f"local{threads}", defaults, threads)
            say(f"local, 1 process, {threads} threads", found)
        if "ray1" in runs or "ray2" in runs:
            import ray

            start = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            say("cluster_start_s", round(time.perf_counter() - start, 2))
            for actors in [k for k in (1, 2) if f"ray{k}" in runs]:
                found = on_ray(jobs, root / f"ray{actors}", defaults, actors)
                say(f"ray, {actors} actor(s), 1 thread each", found)
            start = time.perf_counter()
            ray.shutdown()
            say("cluster_stop_s", round(time.perf_counter() - start, 2))
        made = [d for d in ("local2", "local1", "ray1", "ray2") if (root / d).is_dir()]
        for a_, b_ in zip(made, made[1:]):
            say(f"same bytes {a_} {b_}", same_files(root / a_, root / b_))
        if made:
            say("png_bytes_mean", round(sum(p.stat().st_size for p in (root / made[-1]).glob("*.png")) / a.n))
    say("load_after", os.getloadavg())


if __name__ == "__main__":
    main()
