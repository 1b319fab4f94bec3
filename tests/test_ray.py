"""Batch and serving on Ray (issue 17): one real local Ray cluster started by this module on 127.0.0.1, the
demo model at 2 steps; the local batch and the local server are the oracles."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from argparse import ArgumentParser, Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

# Ray binds every address of the machine unless it believes it is on a laptop; this keeps the test cluster on
# the loopback interface (set before Ray is imported, inherited by its processes).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from cascade.cli import main  # noqa: E402
from cascade.recipe import Recipe  # noqa: E402

CAPTIONS = ["a red circle on a blue background", "a green square on a white background",
            "a yellow triangle on a black background", "a cyan circle on a magenta background",
            "a white square on a red background"]
OPTIONS = ["--model", "demo", "--steps", "2", "--prior-steps", "2", "-q", "--json"]
LINES = 10


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: 2 logical CPUs, no dashboard, nothing beyond 127.0.0.1."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A JSONL batch: captions, a line with its own seed, sampler and negative prompt, one with two images."""
    path = tmp_path_factory.mktemp("jobs") / "jobs.jsonl"
    lines = [{"prompt": CAPTIONS[i % len(CAPTIONS)]} for i in range(LINES - 2)]
    lines += [{"prompt": CAPTIONS[0], "seed": 99, "scheduler": "ddim", "negative": "green"},
              {"prompt": CAPTIONS[1], "n": 2}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def same_picture(ours: str, theirs: str):
    """Two base64 PNGs: the same recipe text, and pixels equal but for the last bit of a few (a replica's
    thread pool may still split a sum differently: one image of four, once, in a full-suite run)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    a, b = (Image.open(io.BytesIO(base64.b64decode(x))) for x in (ours, theirs))
    assert a.text == b.text
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def one_thread(fn):
    """Run fn with one torch thread, as each actor and replica runs: summation order, and so the last bit of
    a few pixels, depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def batch(capsys, jobs, out, *more) -> dict:
    code = main(["batch", str(jobs), "--out", str(out), *OPTIONS, *more])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out[captured.out.rindex('{\n  "done"'):])


def pngs(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


@pytest.fixture(scope="module")
def local(jobs, tmp_path_factory):
    """The local batch's output: the oracle for every Ray run."""
    out = tmp_path_factory.mktemp("local")
    assert one_thread(lambda: main(["batch", str(jobs), "--out", str(out), *OPTIONS[:-1]])) == 0
    return pngs(out)


@pytest.fixture(scope="module")
def on_ray(cluster, jobs, local, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray")
    code = main(["batch", str(jobs), "--out", str(out), *OPTIONS, "--ray", "--actors", "2"])
    assert code == 0
    return out


def test_batch_on_ray_writes_the_local_runs_files(on_ray, local):
    """Same names, same bytes: pixels and every metadata chunk, recipe and A1111 parameters included."""
    assert len(local) == LINES + 1
    made = pngs(on_ray)
    assert list(made) == list(local)
    assert all(made[name] == local[name] for name in local)
    recipe = Recipe.from_png(on_ray / sorted(made)[-3])
    assert (recipe.seed, recipe.scheduler, recipe.negative, recipe.steps) == (99, "ddim", "green", 2)
    assert not [p for p in on_ray.iterdir() if p.suffix != ".png"]  # no temporary files, no errors.jsonl


def test_resumed_batch_makes_only_the_missing_lines(on_ray, local, jobs, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(on_ray, out)
    missing = sorted(local)[2:5]
    for name in missing:
        (out / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    found = batch(capsys, jobs, out, "--ray", "--actors", "1")
    assert (found["done"], found["skipped"], found["failed"], found["images"]) == (3, LINES - 3, 0, 3)
    made = [Path(p).name for r in found["lines"] if r["status"] == "done" for p in r["paths"]]
    assert sorted(made) == missing
    assert pngs(out) == local
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in kept} == kept


def map_workers() -> list:
    """This test's Ray Data actors: processes under this one whose title names the batch's actor class."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "MapBatches(LineActor)" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def kill_an_actor_mid_batch(out: Path, killed: dict):
    """Once two images are written, SIGKILL one actor (it is drawing its next line by then)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        workers = map_workers()
        if len(list(out.glob("*.png"))) >= 2 and workers:
            killed["pid"], killed["written"] = workers[0].pid, len(list(out.glob("*.png")))
            workers[0].kill()
            return
        time.sleep(0.02)


def test_a_killed_actor_costs_only_its_line(cluster, jobs, local, tmp_path, capsys):
    out, killed = tmp_path / "killed", {}
    out.mkdir()
    watcher = threading.Thread(target=kill_an_actor_mid_batch, args=(out, killed))
    watcher.start()
    found = batch(capsys, jobs, out, "--ray", "--actors", "2")
    watcher.join()
    assert killed and killed["written"] < LINES + 1, "the batch ended before an actor was killed"
    assert sorted(r["line"] for r in found["lines"]) == list(range(1, LINES + 1))  # each line once
    assert found["failed"] == 0 and found["done"] + found["skipped"] == LINES
    assert pngs(out) == local  # complete, no duplicates (no -1 names), the same bytes
    assert sorted(p.name for p in out.iterdir()) == sorted(local)  # no temporary files left
    import psutil

    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == "zombie"


def test_ray_missing_is_one_line(jobs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["batch", str(jobs), "--out", str(tmp_path), *OPTIONS, "--ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cascade: error: --ray needs Ray (Ray Data, Ray Serve): "
                   "pip install 'cascade-diffusion[ray]'"]


def test_bad_ray_options_are_one_line_before_anything_starts(jobs, tmp_path, capsys):
    from cascade.server import add_arguments
    from cascade.server.ray_serve import deployment_options

    assert main(["batch", str(jobs), "--out", str(tmp_path), *OPTIONS, "--ray", "--actors", "0"]) == 1
    assert capsys.readouterr().err == "cascade: error: --actors: expected a positive integer, got 0\n"
    parse = add_arguments(ArgumentParser()).parse_args
    assert deployment_options(parse(["demo", "--ray", "--replicas", "3"]))["num_replicas"] == 3
    scaling = deployment_options(parse(["demo", "--ray", "--min-replicas", "1", "--max-replicas", "4"]))
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                             "target_ongoing_requests": 1}
    with pytest.raises(ValueError, match="--min-replicas 5 / --max-replicas 2"):
        deployment_options(parse(["demo", "--ray", "--min-replicas", "5", "--max-replicas", "2"]))


def test_cascade_without_ray_never_imports_it():
    code = ("import sys, argparse, cascade, cascade.cli, cascade.jobs, cascade.batch, cascade.server.app; "
            "from cascade.server import add_arguments; add_arguments(argparse.ArgumentParser()); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def interrupted(url: str, job_id: str) -> dict:
    """Once the job's progress moves, AUTOMATIC1111's interrupt; the job as it ended."""
    import httpx

    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/api/jobs/{job_id}").json()["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.post(f"{url}/sdapi/v1/interrupt").status_code == 200
    while (job := httpx.get(f"{url}/api/jobs/{job_id}").json())["status"] == "running":
        assert time.monotonic() < deadline, "the interrupted job is still running"
        time.sleep(0.05)
    return job


def test_serve_on_two_replicas_answers_like_the_local_server(cluster):
    """Through 2 Ray Serve replicas: concurrent requests get the local server's images, from both replicas;
    a running job stops on AUTOMATIC1111's interrupt and the replicas go on; a bad request answers 422."""
    import httpx
    from serving import FAST, Server, start

    from cascade.server import add_arguments
    from cascade.server.images import Limits
    from cascade.server.ray_serve import build

    args = add_arguments(ArgumentParser()).parse_args(["demo", "--ray", "--replicas", "2"])
    app, executor = build(args, Limits())
    remote = Server(app)
    bodies = [{"prompt": CAPTIONS[i], "seed": 10 + i, **FAST} for i in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda body: httpx.post(f"{remote.url}/sdapi/v1/txt2img", json=body,
                                                            timeout=300), bodies))
        spread = dict(executor.replicas)
        long = httpx.post(f"{remote.url}/api/jobs", json={"prompt": CAPTIONS[0], "steps": 500}, timeout=300)
        assert long.status_code == 202, long.text
        stopped = interrupted(remote.url, long.json()["id"])
        again = httpx.post(f"{remote.url}/sdapi/v1/txt2img", json=bodies[0], timeout=300)
        bad = httpx.post(f"{remote.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 0}, timeout=60)
    finally:
        remote.stop()
        executor.close()
    assert [a.status_code for a in answers] == [200] * 4
    assert len(spread) == 2 and sum(spread.values()) == 4
    assert stopped["status"] == "cancelled" and 0 < stopped["step"] < stopped["steps"]
    assert again.json()["images"] == answers[0].json()["images"]
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "steps"
    local = start()
    try:
        expected = one_thread(lambda: [httpx.post(f"{local.url}/sdapi/v1/txt2img", json=b, timeout=300)
                                       for b in bodies])
    finally:
        local.stop()
    for a, e in zip(answers, expected):
        same_picture(a.json()["images"][0], e.json()["images"][0])
