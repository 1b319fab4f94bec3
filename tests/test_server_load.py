"""A bounded load test on loopback: `python -m cascade.server demo` in its own process, 8 clients, 40 requests
mixed with bad ones and an interrupt. Every good request gets the image the recipe makes alone, every bad
one its 4xx, the server is alive at the end and its memory did not grow after the tenth request."""
import base64
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving import FAST, PROMPT, decode, lying_png, pixels

pytest.importorskip("fastapi")
SEEDS = range(100, 105)
PROMPTS = [PROMPT, "a yellow triangle on a green background"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    """Resident memory in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen([sys.executable, "-m", "cascade.server", "demo", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/sdapi/v1/options", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    yield process, url
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def expected():
    """Each good recipe's image made alone, in this process, by the job layer."""
    from cascade import jobs

    models = jobs.Models()
    out = {}
    for prompt, seed in itertools.product(PROMPTS, SEEDS):
        recipe = jobs.Recipe(model="demo", prompt=prompt, seed=seed, **FAST)
        out[prompt, seed] = pixels(jobs.run(recipe, models)[0].image)
    return out


def good(http, i):
    """Good request i through one of the three APIs: -> ((prompt, seed), image)."""
    prompt, seed = PROMPTS[i % 2], SEEDS[i % len(SEEDS)]
    api = i % 3
    if api == 0:
        r = http.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": seed, **FAST})
        return (prompt, seed), r, r.status_code == 200 and r.json()["images"][0]
    if api == 1:
        r = http.post("/v1/images/generations", json={"prompt": prompt, "seed": seed, **FAST})
        return (prompt, seed), r, r.status_code == 200 and r.json()["data"][0]["b64_json"]
    r = http.post("/api/jobs", json={"prompt": prompt, "seed": seed, **FAST})
    job = r.json()["id"]
    while (state := http.get(f"/api/jobs/{job}").json())["status"] not in ("done", "failed", "cancelled"):
        time.sleep(0.05)
    return (prompt, seed), r, base64.b64encode(http.get(state["results"][0]["url"]).content)


BAD = [  # (request keywords, status)
    (dict(method="POST", url="/sdapi/v1/txt2img", json={"prompt": "a", "steps": 0}), 422),
    (dict(method="POST", url="/sdapi/v1/txt2img", json={"prompt": "a", "sampler_name": "LMS"}), 422),
    (dict(method="POST", url="/sdapi/v1/txt2img", content=b"{not json"), 400),
    (dict(method="POST", url="/sdapi/v1/txt2img",
          json={"override_settings": {"sd_model_checkpoint": "/"}}), 404),
    (dict(method="POST", url="/v1/images/generations", json={"prompt": "a", "size": "72x64"}), 422),
    (dict(method="POST", url="/sdapi/v1/png-info",
          json={"image": base64.b64encode(lying_png()).decode()}), 413),
    (dict(method="POST", url="/api/jobs", json={"prompt": "a", "image_path": "/etc/passwd"}), 422),
    (dict(method="POST", url="/sdapi/v1/img2img", json={"prompt": "a", "init_images": ["AAAA"]}), 422),
]


def interrupted(http):
    """A long job, interrupted once it runs: it ends cancelled, stopped within a step of the interrupt."""
    job = http.post("/api/jobs", json={"prompt": PROMPT, "steps": 400, "prior_steps": 2}).json()["id"]
    while http.get(f"/api/jobs/{job}").json()["step"] < 4:
        time.sleep(0.02)
    http.post("/sdapi/v1/interrupt")
    at = http.get(f"/api/jobs/{job}").json()["step"]
    while (state := http.get(f"/api/jobs/{job}").json())["status"] == "running":
        time.sleep(0.02)
    return state, at


def test_eight_clients_forty_requests(server, expected):
    process, url = server
    plan = [("good", i) for i in range(10)]  # the first ten
    plan += [("good", i) for i in range(10, 30)] + [("bad", i) for i in range(len(BAD))] + [("interrupt", 0)]
    assert len(plan) == 39  # + the interrupt's own POST /sdapi/v1/interrupt = 40 requests

    def do(step):
        kind, i = step
        with httpx.Client(base_url=url, timeout=300) as http:
            if kind == "good":
                return kind, good(http, i)
            if kind == "bad":
                kw, status = BAD[i]
                return kind, (http.request(**kw), status)
            return kind, interrupted(http)

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(do, plan[:10]))
        after_tenth = rss(process.pid)
        rest = list(pool.map(do, plan[10:]))
    seconds = time.perf_counter() - start
    after_last = rss(process.pid)
    for kind, outcome in first + rest:
        if kind == "good":
            key, response, image = outcome
            assert response.status_code in (200, 202), response.text
            assert np.array_equal(pixels(decode(image)), expected[key]), key
        elif kind == "bad":
            response, status = outcome
            assert response.status_code == status and response.json()["error"]["field"], response.text
        else:
            state, at = outcome
            assert state["status"] == "cancelled" and state["step"] <= at + 1
    assert httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] == 0
    assert process.poll() is None
    good_count = sum(kind == "good" for kind, _ in plan)
    print(f"\n40 requests ({good_count} images) by 8 clients in {seconds:.1f} s, "
          f"{good_count / seconds * 60:.0f} images/min; server RSS after the 10th request "
          f"{after_tenth / 1024:.1f} MiB, after the last {after_last / 1024:.1f} MiB")
    assert after_last <= after_tenth * 1.03 + 8 * 1024, (after_tenth, after_last)
