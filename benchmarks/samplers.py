"""Quality against steps for every sampler on the demo model (issue 13), and time per image.

For each sampler at 10, 15, 20 and 25 decoder steps (the prior at its defaults), the three scores of
cascade.demo_world.read over the same captions as benchmarks/demo.py (image i with seed i), next to the
defaults (100 DDPM steps); DeepCache at intervals 2, 3 and 5 on the defaults and on the fastest sampler
setting; whole-call seconds per image (prior, decoder, MoVQ) for each setting, and the reference's best
(the fewest steps within 2 points of the defaults of a sampler its pipeline runs right, DDPM, DDIM or a
DPM-Solver++: its scores equal ours there, as the parity tests show), timed alternately with our fastest
setting within 2 points. The prior runs once per caption: each image's generator state after the prior is
kept and restored for every decoder setting, which draws exactly what the combined pipeline draws.

    python benchmarks/samplers.py [--n 200] [--runs 3] [--out benchmarks/results]

Scores are appended to results/samplers_scores_N.jsonl as each setting finishes and read back on the next run,
so a run that stops is resumed, not repeated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from demo import SIZE, reference_pipeline, world  # noqa: E402

from cascade import KandinskyV22CombinedPipeline  # noqa: E402
from cascade import demo_world as dw  # noqa: E402
from cascade.schedulers import SAMPLERS, scheduler_for  # noqa: E402

SAMPLER_NAMES = [n for n in SAMPLERS if n not in ("unclip", "wuerstchen")]
STEPS = (10, 15, 20, 25)
KEYS = ("shape_colour", "background_colour", "shape")
# The samplers the reference's own Kandinsky pipeline runs right (the parity tests: its output is ours); with
# the Euler family, Heun and UniPC it draws noise or raises.
REFERENCE_RUNS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-karras", "dpm++sde")


def prior_states(pipe, captions):
    """Prior embeddings of every caption (defaults, generator i) and each generator's state after them."""
    embeds, negative, states = [], [], []
    prior = pipe.prior_pipe
    prior.set_progress_bar_config(disable=True)
    for lo in range(0, len(captions), 50):
        gens = [torch.Generator().manual_seed(i) for i in range(lo, min(len(captions), lo + 50))]
        e, n = prior(captions[lo: lo + 50], generator=gens, return_dict=False)
        embeds.append(e), negative.append(n), states.extend(g.get_state() for g in gens)
    return torch.cat(embeds), torch.cat(negative), states


def decode_all(pipe, embeds, negative, states, **call):
    decoder = pipe.decoder_pipe
    decoder.set_progress_bar_config(disable=True)
    images = []
    for lo in range(0, len(states), 50):
        gens = []
        for s in states[lo: lo + 50]:
            g = torch.Generator()
            g.set_state(s)
            gens.append(g)
        images.extend(decoder(image_embeds=embeds[lo: lo + 50], negative_image_embeds=negative[lo: lo + 50],
                              generator=gens, **SIZE, **call).images)
    return images


def variant(pipe, sampler):
    return type(pipe).from_pipe(pipe, scheduler=scheduler_for(sampler, pipe.scheduler.config))


def cached(pipe, deepcache):
    """DeepCache for this thread's calls in the block (a no-op block when deepcache is None)."""
    return pipe.deepcache(deepcache) if deepcache else contextlib.nullcontext()


def seconds(pipe, caption, runs, **call):
    pipe.set_progress_bar_config(disable=True)
    times = []
    for _ in range(runs + 1):  # the first call warms up
        start = time.perf_counter()
        pipe(caption, **SIZE, generator=torch.Generator().manual_seed(0), **call)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def plot(rows, path: Path):
    """Shape score and seconds per image against decoder steps, one line per sampler (PIL only); the
    defaults' (100 DDPM steps) as a grey line and a label."""
    w, h, pad = 900, 380, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    plain = [r for r in rows if r["steps"] in STEPS and r["deepcache"] is None]
    base = rows[0]
    top = max(r["seconds"] for r in plain if r.get("seconds")) * 1.1
    panels = [("shape score (%)", "shape", 30, 100), ("seconds per image", "seconds", 0, top)]
    for p, (title, key, lo, hi) in enumerate(panels):
        x0, x1, y0, y1 = pad + p * w // 2, (p + 1) * w // 2 - 20, pad, h - pad

        def y(v):
            return y1 - (min(max(v, lo), hi) - lo) / (hi - lo) * (y1 - y0)

        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, y0 - 20), f"{title} against decoder steps (10-25)", fill="black")
        if base.get(key) is not None:
            where = base[key] if base[key] <= hi else hi
            draw.line([(x0, y(where)), (x1, y(where))], fill="#aaaaaa", width=1)
            draw.text((x0 + 5, y(where) - 13), f"defaults, 100 DDPM steps: {base[key]:.3g}", fill="#777777")
        for k, name in enumerate(SAMPLER_NAMES):
            pts = [(x0 + (r["steps"] - 10) / 15 * (x1 - x0), y(r[key]))
                   for r in plain if r["sampler"] == name and r.get(key) is not None]
            colour = palette[k % len(palette)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for px, py in pts:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            if p == 0:
                draw.text((x1 - 110, y1 - 15 - 13 * k), name, fill=colour)
        for v in (lo, (lo + hi) / 2, hi):
            draw.text((x0 - 40, y(v) - 6), f"{v:.3g}", fill="black")
        for n in STEPS:
            draw.text((x0 + (n - 10) / 15 * (x1 - x0) - 6, y1 + 4), str(n), fill="black")
    img.save(path)


def markdown(rows) -> str:
    """The README's tables: a row per sampler (and DeepCache setting), a column per step count, then the
    100-step rows; each cell shape colour / background / shape in %, and the time per image over the defaults'."""
    def cell(r):
        return " / ".join(f"{r[k]:g}" for k in KEYS) + (f" · {r['ratio']:.2f}x" if "ratio" in r else "")

    def label(r):
        return r["sampler"] + (f", DeepCache {r['deepcache']}" if r["deepcache"] else "")

    lines = ["| sampler | " + " | ".join(f"{n} steps" for n in STEPS) + " |", "|---" * (len(STEPS) + 1) + "|"]
    for name in dict.fromkeys(label(r) for r in rows if r["steps"] in STEPS):
        mine = {r["steps"]: r for r in rows if label(r) == name and r["steps"] in STEPS}
        lines.append(f"| {name} | " + " | ".join(cell(mine[n]) if n in mine else "" for n in STEPS) + " |")
    lines += ["", "| 100 steps | scores · time |", "|---|---|"]
    lines += [f"| {label(r)} | {cell(r)} |" for r in rows if r["steps"] not in STEPS]
    return "\n".join(lines)


def scores_table(pipe, captions, prior, settings, log: Path):
    """Scores of each setting; rows already in the log are read back, new ones appended as they finish."""
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[r["sampler"], r["steps"], r["deepcache"]] = r
    rows = []
    for sampler, steps, deepcache in settings:
        if (sampler, steps, deepcache) in done:
            rows.append(done[sampler, steps, deepcache])
            continue
        if not prior:
            prior.extend(prior_states(pipe, captions))
        embeds, negative, states = prior
        with cached(pipe, deepcache):
            images = decode_all(variant(pipe, sampler), embeds, negative, states, num_inference_steps=steps)
        s = dw.score(images, captions)
        rows.append({"sampler": sampler, "steps": steps, "deepcache": deepcache,
                     **{k: round(100 * s[k], 1) for k in KEYS}})
        with log.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(json.dumps(rows[-1]), flush=True)
    return rows


def score_phase(args, pipe, captions):
    prior, log = [], args.out / f"samplers_scores_{args.n}.jsonl"
    settings = [("ddpm", 100, None)] + [(s, n, None) for s in args.samplers.split(",") for n in STEPS]
    rows = scores_table(pipe, captions, prior, settings, log)
    base = rows[0]
    within = [r for r in rows[1:] if all(base[k] - r[k] <= 2 for k in KEYS)]
    fastest = min(within, key=lambda r: r["steps"] * (2 if r["sampler"] == "heun" else 1)) if within else None
    caching = [(base["sampler"], 100, k) for k in (2, 3, 5)]
    if fastest:
        caching += [(fastest["sampler"], fastest["steps"], k) for k in (2, 3, 5)]
    return rows + scores_table(pipe, captions, prior, caching, log)


def time_phase(args, pipe, rows, caption):
    """Whole calls, one image; the defaults timed again after every setting (this machine drifts)."""
    base = rows[0]
    for r in rows:
        with cached(pipe, r["deepcache"]):
            r["seconds"] = seconds(variant(pipe, r["sampler"]), caption, args.runs, num_inference_steps=r["steps"])
        r["ratio"] = r["seconds"] / seconds(pipe, caption, 1)
        print(json.dumps(r), flush=True)
    good = [r for r in rows[1:] if all(base[k] - r[k] <= 2 for k in KEYS)]
    ref_rows = [r for r in good if r["sampler"] in REFERENCE_RUNS and r["deepcache"] is None]
    if not ref_rows:
        return {}
    best = min(ref_rows, key=lambda r: r["steps"])
    ours_best = min(good, key=lambda r: r["seconds"])
    import diffusers

    ref = reference_pipeline("demo")
    cls, overrides = SAMPLERS[best["sampler"]]
    ref.scheduler = getattr(diffusers, cls).from_config({**dict(ref.scheduler.config), **overrides})
    ours = variant(pipe, ours_best["sampler"])
    pairs = []  # ours and theirs alternating, a ratio per pair: the drift cancels within a pair
    for _ in range(args.runs):
        with cached(pipe, ours_best["deepcache"]):
            mine = seconds(ours, caption, 1, num_inference_steps=ours_best["steps"])
        pairs.append((mine, seconds(ref, caption, 1, num_inference_steps=best["steps"])))
    return {"reference_best": {**best, "reference_seconds": statistics.median(t for _, t in pairs)},
            "ours_best": ours_best, "ours_best_vs_defaults": ours_best["ratio"],
            "ours_best_vs_reference_best": statistics.median(m / t for m, t in pairs)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    parser.add_argument("--phase", choices=("scores", "times", "both"), default="both",
                        help="times reads the scores a scores run saved (timing wants a quiet machine)")
    parser.add_argument("--report", action="store_true", help="print the table of the last run's samplers.json")
    args = parser.parse_args(argv)
    if args.report:  # the table and the plot again, from the last run's samplers.json
        rows = json.loads((args.out / "samplers.json").read_text())["rows"]
        plot(rows, args.out / "samplers.png")
        return print(markdown(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = KandinskyV22CombinedPipeline.from_pretrained("demo")
    captions = [c for _, c, _ in world(args.n)]
    path = args.out / "samplers.json"
    rows = score_phase(args, pipe, captions) if args.phase != "times" else json.loads(path.read_text())["rows"]
    summary = time_phase(args, pipe, rows, captions[0]) if args.phase != "scores" else {}
    path.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print(json.dumps(summary), flush=True)
    if args.phase != "scores":
        plot(rows, args.out / "samplers.png")


if __name__ == "__main__":
    main()
