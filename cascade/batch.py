"""`cascade batch JOBS --out DIR`: many recipes in one process, resumable (issue 17, the local part).

JOBS is a JSONL file (one recipe per line, the keys of a PNG's recipe; the command-line options are the
defaults a line's keys override) or a text file (one prompt per line). A line without a seed gets
`--seed + i` (i counts the lines from 0; --seed defaults to 0 so a re-run asks the same). Paths in a line are
relative to the JOBS file's folder. Every image goes to DIR under a name derived from its line
(`output_name`: line number, a digest of the line's recipe, seed), so a re-run finds what is done and skips
it; a failing line is written with its error to DIR/errors.jsonl and the rest go on.

For other runners (Ray): `read_jobs(path, seed)` gives the lines, `run_line(line, defaults, out, models,
root)` makes (or skips) one line and returns its record, `output_name` names the files. `--ray` calls
`cascade.ray_jobs.run_batch(lines, defaults, out, root, args) -> list of records`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .recipe import (CHECKS, Recipe, RecipeError, check_folder, png_text, read_png, rebase, recipe_values,
                     write_new)

# The generation options of `cascade generate` that batch takes as defaults for every line.
DEFAULTS = ("negative", "steps", "prior_steps", "super_res_steps", "guidance", "prior_guidance", "strength",
            "size", "n", "scheduler", "deepcache", "dtype", "device")


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, in JOBS
    values: dict  # the line's recipe keys (a text line: prompt and seed)
    error: str | None = None  # a line that is no recipe


def read_jobs(path: Path, seed: int = 0) -> list[Line]:
    """The lines of a JSONL or text JOBS file; blank lines (and `#` comments in text files) are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError("jobs", f"{path}: cannot read it ({error})") from None
    rows = [(k + 1, line.strip()) for k, line in enumerate(text.splitlines()) if line.strip()]
    jsonl = Path(path).suffix == ".jsonl" or (rows and rows[0][1].startswith("{"))
    lines = []
    for i, (number, line) in enumerate(rows):
        if not jsonl:
            if not line.startswith("#"):
                lines.append(Line(number, {"prompt": line, "seed": seed + len(lines)}))
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            lines.append(Line(number, {}, f"not JSON: {error}"))
            continue
        if isinstance(values, dict):
            values.setdefault("seed", seed + i)
        lines.append(Line(number, values))
    return lines


def output_name(number: int, recipe: Recipe, seed: int) -> str:
    """The file stem of one image of a line: stable across runs, different for a different recipe."""
    asked = {k: v for k, v in recipe.to_dict().items() if k not in ("n", "seed")}
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]
    return f"{number:05d}-{digest}-{seed}"


def is_done(path: Path, recipe: Recipe) -> bool:
    """Whether `path` is a PNG whose recipe has every value `recipe` asks for (the rest are defaults)."""
    if not path.is_file():
        return False
    try:
        made = recipe_values(read_png(path))
    except ValueError:
        return False
    return all(made.get(k) == v for k, v in recipe_values(png_text(recipe)).items())


def run_line(line: Line, defaults: dict, out: Path, models, root: Path, on_image=None) -> dict[str, Any]:
    """Make the images of one line that are not in `out` yet; a record: line, status (done, skipped or
    failed), paths, images made, seconds, error. `on_image(path or None)` after each image (None: skipped)."""
    from .jobs import prepare

    start, record = time.perf_counter(), {"line": line.number, "status": "failed", "paths": [], "images": 0}
    try:
        if line.error:
            raise RecipeError("line", line.error)
        recipe = rebase(Recipe.from_dict(line.values, defaults), root, out)
        todo = []
        for seed in range(recipe.seed, recipe.seed + recipe.n):
            path = out / f"{output_name(line.number, recipe, seed)}.png"
            record["paths"].append(str(path))
            if is_done(path, recipe.replace(seed=seed, n=1)):
                on_image and on_image(None)
            else:
                todo.append((seed, path))
        job = prepare(recipe, models, root=out) if todo else None
        for seed, path in todo:
            write_new(out, path.stem, job.make(seed).png(), overwrite=True)
            record["images"] += 1
            on_image and on_image(path)
        record["status"] = "done" if todo else "skipped"
    except Exception as error:  # one line's failure is recorded and the batch goes on
        record["error"] = next((t for t in str(error).splitlines() if t.strip()), type(error).__name__)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def defaults_of(args) -> dict:
    values = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    if "size" in values:
        values["size"] = "{}x{}".format(*values["size"])
    return {**({"model": args.model} if args.model else {}), **({"task": args.task} if args.task else {}),
            **values}


def planned(line: Line, defaults: dict) -> int:
    n = line.values.get("n", defaults.get("n", 1)) if isinstance(line.values, dict) else 1
    return n if isinstance(n, int) and n > 0 else 1


def append_error(out: Path, record: dict, line: Line):
    with open(out / "errors.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"line": record["line"], "error": record["error"], "recipe": line.values}) + "\n")


def batch(args) -> int:
    """Every line in order, one progress bar over all images (skipped ones leave the total), a summary."""
    from tqdm.auto import tqdm

    from .jobs import Models

    out, jobs = check_folder(Path(args.out)), Path(args.jobs)
    lines, defaults = read_jobs(jobs, args.seed or 0), defaults_of(args)
    for key, value in defaults.items():
        CHECKS[key](key, value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "errors.jsonl").unlink(missing_ok=True)
    start, records = time.perf_counter(), []
    if args.ray is not None:
        records = ray_batch(lines, defaults, out, jobs.parent, args)
        for record, line in zip(records, lines):
            if record["status"] == "failed":
                append_error(out, record, line)
        return summary(records, out, time.perf_counter() - start, args.json)
    bar = tqdm(total=sum(planned(line, defaults) for line in lines), unit="image", file=sys.stderr,
               disable=args.quiet, desc="batch")
    models = Models()
    for line in lines:
        before = bar.n
        record = run_line(line, defaults, out, models, jobs.parent, lambda path: path and bar.update(1))
        records.append(record)
        left = planned(line, defaults) - (bar.n - before)
        if record["status"] == "skipped":
            bar.total -= left
            bar.refresh()
        else:
            bar.update(left)
        if record["status"] == "failed":
            append_error(out, record, line)
    bar.close()
    return summary(records, out, time.perf_counter() - start, args.json)


def ray_batch(lines, defaults, out, root, args) -> list[dict]:
    try:
        from .ray_jobs import run_batch
    except ModuleNotFoundError as error:
        raise RecipeError("ray", f"Ray batches need the ray extra (pip install cascade-diffusion[ray]): "
                                 f"{error}") from None
    return run_batch(lines, defaults, out, root, args)


def summary(records: list[dict], out: Path, seconds: float, as_json: bool) -> int:
    """One line (or JSON with every line's record): done, skipped, failed, images per minute."""
    by = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    images = sum(r["images"] for r in records)
    found = {**by, "images": images, "seconds": round(seconds, 2),
             "images_per_minute": round(60 * images / seconds, 2) if seconds > 0 else None}
    print(json.dumps({**found, "lines": records}, indent=2) if as_json else
          f"done {by['done']}, skipped {by['skipped']}, failed {by['failed']}: {images} images in "
          f"{seconds:.1f} s ({found['images_per_minute']} images per minute)"
          + (f"; errors in {out / 'errors.jsonl'}" if by["failed"] else ""))
    return 1 if by["failed"] else 0


def add_parser(sub, add_options):
    """`cascade batch` on the CLI's parser; `add_options(parser, names)` adds the generation options."""
    from .recipe import TASKS

    p = sub.add_parser("batch", help="many recipes from a JSONL or text file, resumable",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("jobs", metavar="JOBS", help="JSONL (a recipe per line) or text (a prompt per line)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the images and errors.jsonl")
    p.add_argument("--model", metavar="MODEL", help="for lines that name none")
    p.add_argument("--task", choices=TASKS, help="for lines that name none (default: text2img)")
    add_options(p, ("seed", *DEFAULTS, "quiet", "json"))
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (a local one without ADDRESS); needs the ray extra")
    p.add_argument("--actors", type=int, default=1, metavar="N", help="Ray actors (with --ray)")
    p.add_argument("--cpus-per-actor", type=float, default=1, metavar="C",
                   help="CPUs (and torch threads) per Ray actor (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0, metavar="G",
                   help="GPUs per Ray actor (default 0; with GPUs the device defaults to cuda)")
    p.set_defaults(run=batch)
