"""How well the demo model draws what it is asked, and how fast (issue 6).

Captions come from the demo world's stream with a fixed seed, image i uses torch.Generator().manual_seed(i),
and cascade.demo_world.read (plain image analysis, not the model's encoders) checks every image against its
caption. Images are generated in batches with one generator per image, which draws the same noise as one
call per caption. Every argument not named here keeps the pipeline's default.

    python benchmarks/demo.py [--model demo] [--n 200] [--only text,steps,ddim,img2img,inpaint,time]
    python benchmarks/demo.py --only text --n 40 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cascade import demo_world as dw

SEED = 20261122  # the captions' stream; training draws from seeds 0..6000
SIZE = dict(height=dw.SIZE, width=dw.SIZE)


def world(n: int, seed: int = SEED) -> list[tuple]:
    return list(itertools.islice(dw.world(seed), n))


def generate(pipe, n: int, chunk: int = 50, **per_image) -> list:
    """pipe(...) over n images in chunks; per_image values are lists of n, the rest are fixed arguments."""
    lists = {k: v for k, v in per_image.items() if isinstance(v, list)}
    fixed = {k: v for k, v in per_image.items() if k not in lists}
    pipe.set_progress_bar_config(disable=True)
    images = []
    for lo in range(0, n, chunk):
        part = {k: v[lo : lo + chunk] for k, v in lists.items()}
        gens = [torch.Generator().manual_seed(i) for i in range(lo, min(n, lo + chunk))]
        images.extend(pipe(**part, **fixed, **SIZE, generator=gens).images)
    return images


def text_scores(model: str, n: int, runs: dict, dtype: str = "float32") -> dict:
    from cascade import DDIMScheduler, KandinskyV22CombinedPipeline

    pipe = KandinskyV22CombinedPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
    ddpm, captions = pipe.scheduler, [c for _, c, _ in world(n)]
    out = {}
    for name, (steps, scheduler) in runs.items():
        pipe.scheduler = ddpm if scheduler == "ddpm" else DDIMScheduler.from_config(ddpm.config)
        extra = {} if steps is None else {"num_inference_steps": steps}
        out[name] = dw.score(generate(pipe, n, prompt=captions, **extra), captions)
    pipe.scheduler = ddpm
    return out


def batching_check(model: str, n: int = 3) -> dict:
    """How far images made in one batch (a generator each) are from one call per caption."""
    from cascade import KandinskyV22CombinedPipeline

    pipe, captions = KandinskyV22CombinedPipeline.from_pretrained(model), [c for _, c, _ in world(n)]
    batched = np.stack(generate(pipe, n, prompt=captions, output_type="np"))
    single = np.stack([pipe(c, **SIZE, generator=torch.Generator().manual_seed(i), output_type="np").images[0]
                       for i, c in enumerate(captions)])
    return {"max_difference": float(np.abs(batched - single).max())}


def img2img_score(model: str, n: int) -> dict:
    """Each world image moved towards another random caption at strength 0.5."""
    from cascade import KandinskyV22Img2ImgCombinedPipeline

    pipe = KandinskyV22Img2ImgCombinedPipeline.from_pretrained(model)
    sources, targets = world(n), [c for _, c, _ in world(n, SEED + 1)]
    images = generate(pipe, n, prompt=targets, image=[Image.fromarray(i) for i, _, _ in sources], strength=0.5)
    return dw.score(images, targets)


def recolour(rng, attributes: dict) -> dict:
    taken = {attributes["shape_colour"], attributes["background_colour"]}
    return {**attributes, "shape_colour": str(rng.choice([c for c in dw.NAMES if c not in taken]))}


def inpaint_score(model: str, n: int) -> dict:
    """The shape's bounding box (grown by 2 pixels) repainted with the caption's new shape colour."""
    from cascade import KandinskyV22InpaintCombinedPipeline
    from cascade.loading import builtin

    pipe = KandinskyV22InpaintCombinedPipeline.from_pretrained(model if builtin(model) else f"{model}-inpaint")
    rng, sources = np.random.default_rng(SEED), world(n)
    targets = [dw.caption(recolour(rng, a)) for _, _, a in sources]
    masks = [Image.fromarray(dw.box(a, grow=2).astype(np.uint8) * 255) for _, _, a in sources]
    images = generate(pipe, n, prompt=targets, image=[Image.fromarray(i) for i, _, _ in sources],
                      mask_image=masks)
    return dw.score(images, targets)


def reference_pipeline(model: str):
    """The reference's combined pipeline over the same folders (its loader cannot find a prior by a local
    name, so the two halves are loaded and joined)."""
    import diffusers

    from cascade.loading import builtin

    decoder = builtin(model) or Path(model)
    prior = diffusers.KandinskyV22PriorPipeline.from_pretrained(decoder.parent / f"{decoder.name}-prior",
                                                                torch_dtype=torch.float32)
    pipe = diffusers.KandinskyV22Pipeline.from_pretrained(decoder, torch_dtype=torch.float32)
    return diffusers.KandinskyV22CombinedPipeline(**pipe.components,
                                                  **{f"prior_{k}": v for k, v in prior.components.items()})


def timed(pipe, caption: str, runs: int) -> tuple[float, np.ndarray]:
    pipe.set_progress_bar_config(disable=True)
    times = []
    for _ in range(runs + 1):  # the first call warms up
        start = time.perf_counter()
        image = pipe(caption, **SIZE, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), image


def seconds_per_image(model: str, runs: int = 5) -> dict:
    """One caption, one image, every default but the size: wall time of whole calls (loading excluded), for
    cascade and for the reference on the same folders, and how far apart their images are."""
    from cascade import KandinskyV22CombinedPipeline

    start = time.perf_counter()
    pipe = KandinskyV22CombinedPipeline.from_pretrained(model)
    load = time.perf_counter() - start
    caption = world(1)[0][1]
    ours, image = timed(pipe, caption, runs)
    theirs, reference = timed(reference_pipeline(model), caption, runs)
    return {"cascade_s": ours, "reference_s": theirs, "ratio": ours / theirs, "load_s": load,
            "max_pixel_difference": float(np.abs(image - reference).max()), "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, or a decoder folder with its -prior and "
                        "-inpaint siblings (what python -m cascade.train writes)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--only", default="text,steps,ddim,img2img,inpaint,time")
    parser.add_argument("--dtype", default="float32", help="the text-to-image scores' dtype (bfloat16: the fast "
                        "CPU path)")
    args = parser.parse_args(argv)
    only, results = set(args.only.split(",")), {}
    runs = {**({"default (100 DDPM steps)": (None, "ddpm")} if "text" in only else {}),
            **({f"{s} DDPM steps": (s, "ddpm") for s in (10, 25, 50)} if "steps" in only else {}),
            **({f"{s} DDIM steps": (s, "ddim") for s in (10, 25, 50, 100)} if "ddim" in only else {})}
    if runs:
        results["batched vs one call each"] = batching_check(args.model)
        results.update(text_scores(args.model, args.n, runs, args.dtype))
    if "img2img" in only:
        results["img2img, strength 0.5"] = img2img_score(args.model, args.n)
    if "inpaint" in only:
        results["inpaint, new shape colour"] = inpaint_score(args.model, args.n)
    if "time" in only:
        results["one image, defaults"] = seconds_per_image(args.model)
    for name, value in results.items():
        print(f"{name:28s} {json.dumps({k: round(v, 3) for k, v in value.items()})}", flush=True)


if __name__ == "__main__":
    main()
