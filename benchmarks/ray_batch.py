"""Images per minute of `cascade batch` locally and on Ray, and Ray's fixed costs (issue 17).

32 demo-world captions (seeds 0..31) as one JOBS file, run three ways on this machine: the local batch (one
process, 2 torch threads), then on a local Ray cluster with 1 and with 2 actors (1 CPU and 1 thread each).
For each: the wall time with every fixed cost, and the rate once the pipelines are loaded (images over the
time from the first actor ready to the last image). Fixed costs: the cluster start (ray.init), an actor's
start (from the batch's submission to its constructor, torch imported) and its model load (the demo
pipeline built from its folder). The load average is printed before and after: other work on the machine
shares its cores.

    python benchmarks/ray_batch.py [--n 32] [--steps 20] [--prior-steps 10] [--json]
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


def local(jobs: Path, out: Path, defaults: dict) -> dict:
    """The local batch's loop (what `cascade batch` runs without --ray), 2 threads, load timed apart."""
    torch.set_num_threads(2)
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
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-only cluster
    defaults = {"model": "demo", "steps": a.steps, "prior_steps": a.prior_steps}
    found = {"load_before": os.getloadavg(), "n": a.n, "steps": a.steps, "prior_steps": a.prior_steps}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jobs = jobs_file(root, a.n)
        found["local"] = local(jobs, root / "local", defaults)
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        found["cluster_start_s"] = round(time.perf_counter() - start, 2)
        for actors in (1, 2):
            found[f"ray_{actors}"] = on_ray(jobs, root / f"ray{actors}", defaults, actors)
        start = time.perf_counter()
        ray.shutdown()
        found["cluster_stop_s"] = round(time.perf_counter() - start, 2)
        found["same_bytes_ray1_ray2"] = same_files(root / "ray1", root / "ray2")
        found["same_bytes_local_ray1"] = same_files(root / "local", root / "ray1")
        found["png_bytes_mean"] = round(sum(p.stat().st_size for p in (root / "ray2").glob("*.png")) / a.n)
    found["load_after"] = os.getloadavg()
    print(json.dumps(found, indent=2) if a.json else "\n".join(f"{k}: {v}" for k, v in found.items()))


if __name__ == "__main__":
    main()
