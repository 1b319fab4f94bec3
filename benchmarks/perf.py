"""cascade against the reference, side by side in one run (issue 15): import, load, call and peak memory.

Each measurement runs in its own worker process, the two libraries alternating, the median of `--pairs`
pairs reported (speed drifts 10-20 % between processes on the shared CPU). Every worker appends its
figures to out/perf/results.jsonl, so several short runs add up to one table (`--report`).

    python benchmarks/perf.py --job medium [--dtype bfloat16] [--pairs 3]   # Kandinsky 2.2 decoder job
    python benchmarks/perf.py --job decoder --steps 2                       # real-size decoder, 512 px
    python benchmarks/perf.py --tiling 512,768,1024,2048                    # MoVQ decode memory, tiled or not
    python benchmarks/perf.py --job decoder --device cuda --dtype float16 --peak-tflops 989
    python benchmarks/perf.py --report

The medium job is the Kandinsky 2.2 decoder with the real block types at reduced width (UNet 134 M,
MoVQ 17 M parameters, random weights saved once in the reference's format), 256 x 256, guidance 4.
Peak memory: the worker's ru_maxrss (everything: torch runtime, weights, activations), its resident size
after import and after loading; with CUDA, the allocator's peak. TFLOP/s: the decoder steps' operations
(FlopCounterMode on the meta device: exact, independent of the load) over the call's wall time, MoVQ
decode included, so a lower bound on the steps' own rate.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("out/perf")
JOBS = {"medium": dict(unet=(128, 256, 320, 384), movq=(64, 128, 128, 256), size=256, steps=10),
        "decoder": dict(unet=None, movq=None, size=512, steps=2)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(folder: Path, job: dict):
    import torch

    from cascade import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel, presets

    torch.manual_seed(0)
    unet = {**presets.KANDINSKY22_UNET, **({"block_out_channels": job["unet"]} if job["unet"] else {})}
    movq = {**presets.MOVQ, **({"block_out_channels": job["movq"]} if job["movq"] else {})}
    scheduler = DDPMScheduler(**presets.KANDINSKY22_DECODER_SCHEDULER)
    pipe = KandinskyV22Pipeline(unet=UNet2DConditionModel(**unet), movq=VQModel(**movq), scheduler=scheduler)
    pipe.save_pretrained(folder)


def decoder_flops(folder: str, size: int) -> float:
    """Operations of one guided decoder step (a UNet forward on a batch of two), counted on meta tensors with
    cascade's UNet built from the folder's config (both libraries run the same architecture)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cascade import UNet2DConditionModel
    from cascade.config import read_json

    path = Path(folder) / "unet" / "config.json"
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNet2DConditionModel.config_class.from_dict(read_json(path), str(path)))
        c = unet.config
        x = torch.randn(2, c.in_channels, size // 8, size // 8)
        embeds = torch.randn(2, c.encoder_hid_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([500] * 2), None, added_cond_kwargs={"image_embeds": embeds})
    return counter.get_total_flops()


def worker(lib: str, folder: str, a) -> dict:
    t0 = time.perf_counter()
    import torch

    module = __import__(lib)
    cls = module.KandinskyV22Pipeline
    t_import, rss_import = time.perf_counter() - t0, rss_mb()
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    pipe = cls.from_pretrained(folder, torch_dtype=dtype).to(a.device)
    t_load, rss_load = time.perf_counter() - t0, rss_mb()
    pipe.set_progress_bar_config(disable=True)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    embeds, negative = (torch.randn(1, pipe.unet.config.encoder_hid_dim, generator=g).to(a.device, dtype)
                        for _ in range(2))
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    image = pipe(image_embeds=embeds, negative_image_embeds=negative, height=a.size, width=a.size,
                 num_inference_steps=a.steps, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    sync()
    t_call = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else peak_mb()
    np_path = OUT / f"{lib}-{a.job}-{a.dtype}.npy"
    __import__("numpy").save(np_path, image)
    result = dict(lib=lib, job=a.job, dtype=a.dtype, device=a.device, size=a.size, steps=a.steps,
                  import_s=t_import, load_s=t_load, call_s=t_call, peak_mb=peak, rss_import_mb=rss_import,
                  rss_load_mb=rss_load, finite=bool(__import__("numpy").isfinite(image).all()))
    if a.peak_tflops:
        flops = decoder_flops(folder, a.size) * a.steps
        result.update(tflops=flops / t_call / 1e12, peak_fraction=flops / t_call / 1e12 / a.peak_tflops)
    return result


def run_pairs(a):
    job = JOBS[a.job]
    folder = OUT / f"folder-{a.job}"
    if not (folder / "model_index.json").is_file():
        build(folder, job)
    for _ in range(a.pairs):
        for lib in ("cascade", "diffusers"):
            cmd = [sys.executable, __file__, "--worker", lib, "--job", a.job, "--dtype", a.dtype,
                   "--device", a.device, "--size", str(a.size), "--steps", str(a.steps),
                   "--peak-tflops", str(a.peak_tflops or 0)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["load_avg"] = float(Path("/proc/loadavg").read_text().split()[0])
            with open(OUT / "results.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result))
    import numpy as np

    ours, ref = (np.load(OUT / f"{lib}-{a.job}-{a.dtype}.npy") for lib in ("cascade", "diffusers"))
    print(f"max difference to the reference: {float(np.abs(ours - ref).max()):.2e}")


class LiveBytes:
    """Bytes of the tensors ops allocate (views and in-place results excluded), their peak while alive:
    a decode's activation memory, counted on meta tensors in no time and at any size."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not any(r.alias_info for r in func._schema.returns):
                    counter.track(out)
                return out

        self.mode, self.live, self.peak = Mode(), 0, 0

    def track(self, out):
        import weakref

        import torch

        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self.free, n)

    def free(self, n):
        self.live -= n


def tiling_curve(sizes: list[int]) -> list[dict]:
    """Peak activation memory of a real-size MoVQ decode (meta device) at each size, tiled or not."""
    import torch

    from cascade import VQModel, presets
    from cascade.loading import no_init

    with torch.device("meta"), no_init():
        movq = VQModel(**presets.MOVQ).eval()
    rows = []
    for size in sizes:
        row = {"size": size}
        for tiled in (False, True):
            movq.enable_tiling() if tiled else movq.disable_tiling()
            counter = LiveBytes()
            with torch.no_grad(), torch.device("meta"), counter.mode:
                movq.decode(torch.randn(1, 4, size // 8, size // 8), force_not_quantize=True)
            row["tiled_mb" if tiled else "untiled_mb"] = counter.peak / 2**20
        rows.append(row)
        print(json.dumps(row))
    return rows


def report():
    """Medians per library and job/dtype from results.jsonl, with cascade / reference ratios."""
    rows = [json.loads(line) for line in open(OUT / "results.jsonl")]
    keys = ("import_s", "load_s", "call_s", "peak_mb")
    for setting in sorted({(r["job"], r["dtype"], r["device"]) for r in rows}):
        med = {lib: {k: statistics.median(r[k] for r in rows if (r["job"], r["dtype"], r["device"]) == setting
                                          and r["lib"] == lib) for k in keys}
               for lib in ("cascade", "diffusers") if any(r["lib"] == lib for r in rows)}
        n = sum(1 for r in rows if (r["job"], r["dtype"], r["device"]) == setting) // 2
        print(f"{' '.join(setting)} ({n} pairs)")
        for k in keys:
            ours, ref = (med.get(lib, {}).get(k, float("nan")) for lib in ("cascade", "diffusers"))
            print(f"  {k:10}{ours:10.2f}{ref:10.2f}{ours / ref:8.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--job", choices=list(JOBS), default="medium")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak: prints the fraction")
    p.add_argument("--tiling", help="comma-separated sizes: MoVQ decode memory with and without tiling")
    p.add_argument("--report", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.size, a.steps = a.size or JOBS[a.job]["size"], a.steps or JOBS[a.job]["steps"]
    OUT.mkdir(parents=True, exist_ok=True)
    if a.worker:
        print(json.dumps(worker(a.worker, str(OUT / f"folder-{a.job}"), a)))
    elif a.tiling:
        tiling_curve([int(s) for s in a.tiling.split(",")])
    elif a.report:
        report()
    else:
        run_pairs(a)


if __name__ == "__main__":
    main()
