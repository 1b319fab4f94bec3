"""The same Kandinsky 2.2 text-to-image job in cascade and in the reference, one run, ratios printed.

The decoder has the real checkpoints' block types, heads and embedding paths at reduced width (random
weights, saved once in the reference's format); each library loads the same folder in its own worker
process, so import, load, wall time and peak memory are measured apart. With CUDA, peak memory is the
allocator's peak; on the CPU it is the worker's peak resident set above its size before loading.

    python benchmarks/kandinsky.py [--device cuda] [--dtype float16] [--size 512] [--steps 20] [--width 1.0]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(folder: Path, width: float):
    import torch

    from cascade import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel, presets

    torch.manual_seed(0)
    scale = lambda cs: tuple(max(64, round(c * width / 64) * 64) for c in cs)  # noqa: E731  (heads of 64)
    unet = UNet2DConditionModel(**{**presets.KANDINSKY22_UNET,
                                   "block_out_channels": scale(presets.KANDINSKY22_UNET["block_out_channels"])})
    movq = VQModel(**{**presets.MOVQ, "block_out_channels": scale(presets.MOVQ["block_out_channels"])})
    KandinskyV22Pipeline(unet=unet, scheduler=DDPMScheduler(**presets.KANDINSKY22_DECODER_SCHEDULER),
                         movq=movq).save_pretrained(folder)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(lib: str, folder: str, device: str, dtype: str, size: int, steps: int, runs: int):
    t0 = time.perf_counter()
    import torch

    module = __import__(lib)
    t_import = time.perf_counter() - t0
    torch_dtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    pipe = module.KandinskyV22Pipeline.from_pretrained(folder, torch_dtype=torch_dtype).to(device)
    t_load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    base = rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dim = pipe.unet.config.encoder_hid_dim
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, dim, generator=g).to(device, torch_dtype)
    negative = torch.randn(1, dim, generator=g).to(device, torch_dtype)
    times = []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        image = pipe(image_embeds=embeds, negative_image_embeds=negative, height=size, width=size,
                     num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    print(json.dumps(dict(import_s=t_import, load_s=t_load, run_s=min(times), peak_mb=peak,
                          checksum=float(abs(image).mean()))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--width", type=float, default=0.25, help="fraction of the real channel widths")
    p.add_argument("--folder", default="out/bench-kandinsky")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.folder, a.device, a.dtype, a.size, a.steps, a.runs)
    folder = Path(a.folder) / f"w{a.width}"
    if not (folder / "model_index.json").is_file():
        build(folder, a.width)
    results = {}
    for lib in ("cascade", "diffusers"):
        cmd = [sys.executable, __file__, "--worker", lib, "--folder", str(folder), "--device", a.device,
               "--dtype", a.dtype, "--size", str(a.size), "--steps", str(a.steps), "--runs", str(a.runs)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[lib] = json.loads(out)
    ours, ref = results["cascade"], results["diffusers"]
    print(f"Kandinsky 2.2 decoder, width x{a.width}, {a.size}px, {a.steps} steps, {a.device} {a.dtype}")
    print(f"{'':10}{'cascade':>12}{'reference':>12}{'ratio':>8}")
    for key in ("import_s", "load_s", "run_s", "peak_mb"):
        print(f"{key:10}{ours[key]:12.3f}{ref[key]:12.3f}{ours[key] / ref[key]:8.2f}")
    print(f"same image: {abs(ours['checksum'] - ref['checksum']) < 1e-3}")


if __name__ == "__main__":
    main()
