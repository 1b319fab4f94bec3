"""DeepCache's wall-time ratio on a real-size Kandinsky 2.2 decoder UNet (the checkpoint's configuration,
random weights), decoder only: the plain step against DeepCache at intervals 2, 3 and 5.

The UNet runs as the decoder runs it under guidance: a batch of two (unconditional and conditional
halves; `--batch 1` halves the time) at the latent size of a `--size` image. Measured: the fastest full
and cached (shallow stage only) forward of `--repeats` each, one more full one warming up; from them a
`--steps` loop's ratio (interval N: ceil(steps / N) full forwards, the rest cached); the same ratio from
operation counts (FlopCounterMode on the meta device: exact and independent of the machine's load;
`--flops-only` stops there); with `--loop`, whole loops timed as such (one plain loop plus one per
interval: slower).

    python benchmarks/deepcache.py [--size 512] [--batch 2] [--steps 9] [--repeats 1] [--branch 0]
                                   [--intervals 2 3 5] [--loop] [--flops-only] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time


def real_size_unet():
    import torch

    from cascade import UNet2DConditionModel, presets

    with torch.device("meta"):
        unet = UNet2DConditionModel(**presets.KANDINSKY22_UNET)
    unet = unet.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in unet.modules():  # PyTorch's own initialisation, as a freshly built model has
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return unet.eval()


def inputs(unet, size: int, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    latent = size // 8  # MoVQ's factor
    x = torch.randn(batch, unet.config.in_channels, latent, latent, generator=g)
    embeds = torch.randn(batch, unet.config.encoder_hid_dim, generator=g)
    return x, dict(encoder_hidden_states=None, added_cond_kwargs={"image_embeds": embeds}, return_dict=False)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def forward_times(unet, x, kw, repeats: int, branch: int) -> tuple[float, float]:
    """Fastest seconds of a full and of a cached forward: at interval 2 in one scope, 2 * repeats + 1
    forwards alternate full and cached, starting and ending full (the first one also warms up)."""
    from cascade import deepcache

    unet.enable_deepcache(cache_interval=2, cache_branch_id=branch)
    with deepcache.call_scope():
        times = [timed(lambda: unet(x, 500, **kw)) for _ in range(2 * repeats + 1)]
    unet.disable_deepcache()
    return min(times[0::2]), min(times[1::2])


def flops(size: int, batch: int, branch: int) -> tuple[float, float]:
    """Floating-point operations of a full and of a cached forward, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cascade import UNet2DConditionModel, deepcache, presets

    with torch.device("meta"):
        unet = UNet2DConditionModel(**presets.KANDINSKY22_UNET).eval()
        x, kw = inputs(unet, size, batch)
    unet.enable_deepcache(cache_interval=2, cache_branch_id=branch)
    counts = []
    with deepcache.call_scope(), torch.no_grad():
        for _ in range(2):
            with FlopCounterMode(display=False) as counter:
                unet(x, 500, **kw)
            counts.append(counter.get_total_flops())
    return counts[0], counts[1]


def ratio(steps: int, interval: int, full: float, cached: float) -> float:
    """Plain over DeepCache for a loop of `steps`: ceil(steps / interval) full forwards, the rest cached."""
    n_full = math.ceil(steps / interval)
    return steps * full / (n_full * full + (steps - n_full) * cached)


def loop_time(unet, x, kw, steps: int) -> float:
    """A whole denoising-shaped loop in one call scope; the update only keeps inputs changing."""
    from cascade import deepcache

    def run():
        y = x
        with deepcache.call_scope():
            for i in range(steps):
                y = y - 0.01 * unet(y, 999 - 100 * i, **kw)[0][:, :y.shape[1]]

    return timed(run)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--batch", type=int, default=2, help="2: guidance's two halves; 1 halves the time")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--loop", action="store_true")
    p.add_argument("--flops-only", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = dict(size=args.size, batch=args.batch, steps=args.steps, branch=args.branch,
                  threads=args.threads)
    full_flops, cached_flops = flops(args.size, args.batch, args.branch)
    result.update(full_tflop=round(full_flops / 1e12, 3), cached_share=round(cached_flops / full_flops, 3),
                  **{f"flop_ratio_interval_{n}": round(ratio(args.steps, n, full_flops, cached_flops), 2)
                     for n in args.intervals})
    if args.flops_only:
        print(json.dumps(result))
        return
    unet = real_size_unet()
    x, kw = inputs(unet, args.size, args.batch)
    result["load_before"] = os.getloadavg()[0]
    with torch.no_grad():
        full, cached = forward_times(unet, x, kw, args.repeats, args.branch)
        result.update(full_s=round(full, 2), cached_s=round(cached, 2),
                      **{f"ratio_interval_{n}": round(ratio(args.steps, n, full, cached), 2)
                         for n in args.intervals})
        if args.loop:
            plain = loop_time(unet, x, kw, args.steps)
            result["loop_plain_s"] = round(plain, 2)
            for n in args.intervals:
                unet.enable_deepcache(cache_interval=n, cache_branch_id=args.branch)
                result[f"loop_ratio_interval_{n}"] = round(plain / loop_time(unet, x, kw, args.steps), 2)
                unet.disable_deepcache()
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
