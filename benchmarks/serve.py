"""Requests per minute: the same images through `cascade serve` (one process, models loaded once) and through
one-at-a-time `cascade generate` calls (a process and a model load per image).

    python benchmarks/serve.py [--images 6] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPT = "a red circle on a blue background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_server(images: int, steps: int, clients: int) -> tuple[float, float]:
    """(seconds to start and load, seconds for the images) with `clients` clients at once."""
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "cascade.server", "demo", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/sdapi/v1/options", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        ready = time.perf_counter()

        def one(seed):
            body = {"prompt": PROMPT, "seed": seed, "steps": steps}
            return httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600).raise_for_status()

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(images)))
        return ready - start, time.perf_counter() - ready
    finally:
        server.terminate()
        server.wait(30)


def through_cli(images: int, steps: int) -> float:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for seed in range(images):
            subprocess.run([sys.executable, "-m", "cascade", "generate", "demo", PROMPT, "--seed", str(seed),
                            "--steps", str(steps), "--out", out, "-q"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="decoder steps (the prior keeps its default)")
    p.add_argument("--clients", type=int, default=4, help="clients sending to the server at once")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    per_minute = lambda seconds: args.images / seconds * 60  # noqa: E731
    print(f"{args.images} demo images, {args.steps} decoder steps, {os.cpu_count()} CPUs")
    print("| how | seconds | images per minute |\n|---|---:|---:|", flush=True)
    load, served = through_server(args.images, args.steps, args.clients)
    rows = [(f"`cascade serve`, {args.clients} clients (start and load, {load:.1f} s, not counted)", served),
            ("`cascade serve`, start and load counted", load + served),
            ("`cascade generate`, one call per image", None)]
    for how, seconds in rows:
        seconds = through_cli(args.images, args.steps) if seconds is None else seconds
        print(f"| {how} | {seconds:.1f} | {per_minute(seconds):.0f} |", flush=True)


if __name__ == "__main__":
    main()
