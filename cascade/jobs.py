"""The job layer under the command line, the server and batch jobs: a recipe, the pipelines it needs (loaded
once), one function that runs it, and the PNG that carries it.

    models = Models()
    recipe = Recipe.from_dict({"model": "demo", "prompt": "a red circle on a blue background", "seed": 7})
    for result in run(recipe, models, on_step=lambda stage, step, total: ...):
        write_new(Path("out"), f"text2img-{result.recipe.seed}", result.png())

- `Recipe` (cascade/recipe.py, re-exported here): a frozen dataclass (model, task, prompt, negative, seed,
  steps, prior_steps, super_res_steps, guidance, prior_guidance, strength, size (width, height), scheduler,
  deepcache, dtype, device, the inputs image/mask/rect/hint/item, n), validated on construction: a
  `RecipeError` (a ValueError) naming the field. Built from keyword arguments (the CLI's options), from a
  dict (`Recipe.from_dict`: an HTTP request or a JSONL line, keys as in the PNG recipe, size as "WxH"), or
  from a PNG (`Recipe.from_png`). Input paths stay as given, relative to the `root` folder `run` takes;
  `rebase` re-expresses them relative to another folder (the CLI records them relative to --out).
- `Models`: a cache of pipelines, one per (folder, class, dtype, device), shared by every run; thread-safe.
- `run(recipe, models, on_step=None, cancel=None, root=None, images=None) -> list[Result]`: image i uses
  seed `seed + i` (a random seed when None), so each can be remade alone; `on_step(stage, step, total)`
  after every step of every stage; `cancel` (a threading.Event) is checked every step and raises
  `Cancelled`; the sampler and DeepCache apply to a per-call pipeline derived from the cached one (fresh
  schedulers), never to the shared one. `images` gives in-memory inputs ({"image": PIL image, ...}) that
  replace reading the recipe's paths (the server's uploads). `prepare` does all that can fail before a model
  runs (inputs read, options checked, pipeline loaded) and returns a `Job` whose `make(seed)` is one image.
- `Result`: the recipe as used (defaults filled in, its own seed, n=1), the image, the seconds it took;
  `png()` is PNG bytes with the recipe in text chunks and an AUTOMATIC1111-style `parameters` chunk;
  `read_png` and `parse_parameters` read both back.
- `write_new(folder, stem, data, overwrite=False)`: atomic writes under a new name (stem-1, stem-2, ...).
"""
from __future__ import annotations

import inspect
import io
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .recipe import (A1111_SAMPLERS, DEMO_DEFAULTS, IMAGE_SUFFIXES, OPTIONS, TASKS, Cancelled, Recipe,
                     RecipeError, at, check_folder, open_image, parameters, parse_parameters, parse_size,
                     png_text, read_png, rebase, write_new)

__all__ = ["A1111_SAMPLERS", "Cancelled", "Job", "Models", "Recipe", "RecipeError", "Result", "TASKS",
           "check_folder", "locate", "open_image", "parameters", "parse_parameters", "parse_size", "prepare",
           "read_png", "rebase", "run", "write_new"]

OnStep = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------- models

def locate(model: str, root: Path | None = None, patterns=None) -> Path:
    """MODEL as a folder (relative to `root`, then to the working folder), the built-in demo, or a Hub repo id
    downloaded (what a load reads, or only `patterns`)."""
    from .loading import builtin
    from .pipelines.core import download, resolve

    path = Path(model).expanduser()
    if root is not None and not path.is_absolute() and at(root, model).is_dir():
        return at(root, model)
    if path.is_dir():
        return path
    if (own := builtin(model)) is not None:
        return own
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"{model}: no such folder (and not a Hub repo id, owner/name)")
    return download(model) if patterns is None else resolve(model, None, patterns)


def pipeline_name(folder: Path) -> str:
    """The pipeline class a folder's model_index.json names."""
    from .config import read_json

    index = read_json(folder / "model_index.json")
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"{folder / 'model_index.json'}: no _class_name naming the pipeline")
    return name


def check_device(device: str | None):
    import torch

    try:
        where = torch.device(device or "cpu")
    except RuntimeError:
        raise RecipeError("device", f"expected cpu, cuda, cuda:1, mps, ..., got {device!r}") from None
    if where.type != "cpu" and not getattr(getattr(torch, where.type, None), "is_available", bool)():
        raise RecipeError("device", f"{device} is not available here")


class Models:
    """Pipelines loaded once per (folder, class, dtype, device) and shared by every run. `on_load(folder,
    class)` is told before each load (the CLI says what it loads)."""

    def __init__(self, on_load: Callable | None = None):
        self._pipes: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.on_load = on_load

    def pipeline(self, folder: Path, cls: type, dtype: str | None = None, device: str | None = None):
        import torch

        where = str(torch.device(device or "cpu"))
        key = (str(Path(folder).resolve()), cls.__name__, dtype, where)
        with self._lock:
            if key not in self._pipes:
                if self.on_load is not None:
                    self.on_load(folder, cls)
                pipe = load(folder, cls, dtype, where)
                # The dtype it got serves recipes that name it (a replayed PNG's) as well.
                got = key[:2] + (str(pipe.dtype).removeprefix("torch."), where)
                self._pipes[key] = self._pipes[got] = pipe
            return self._pipes[key]

    def __len__(self) -> int:
        return len({id(p) for p in self._pipes.values()})


def load(folder: Path, cls: type, dtype: str | None, device: str | None):
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-file loading bars; stages report through on_step
    pipe = cls.from_pretrained(folder, torch_dtype=getattr(torch, dtype) if dtype else None)
    pipe = pipe.to(torch.device(device or "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------- inputs

def read_inputs(recipe: Recipe, root: Path, given: dict) -> dict:
    """The prompt and images a task reads, as the pipeline parameters they fill (a hint as (1, 3, H, W) in
    [0, 1]); `given` images replace reading the recipe's paths."""
    import numpy as np
    import torch

    kw: dict[str, Any] = {"prompt": recipe.prompt} if recipe.prompt is not None else {}
    for name, key, mode in (("image", "image", "RGB"), ("mask", "mask_image", "L"), ("hint", "hint", "RGB")):
        if given.get(name) is not None:
            kw[key] = given[name].convert(mode)
        elif getattr(recipe, name) is not None:
            kw[key] = open_image(at(root, getattr(recipe, name)), mode, name, getattr(recipe, name))
    if "mask_image" in kw and kw["mask_image"].size != kw["image"].size:
        raise RecipeError("mask", "{}x{}, image {}x{}: they must be the same size".format(
            *kw["mask_image"].size, *kw["image"].size))
    if recipe.rect is not None:
        kw["mask_image"] = rect_mask(kw["image"], recipe.rect)
    if "hint" in kw:
        kw["hint"] = torch.from_numpy(np.asarray(kw["hint"], np.float32) / 255).permute(2, 0, 1)[None]
    if recipe.item is not None:
        items = [read_item(item, root) for item in recipe.item]
        kw["images_and_prompts"], kw["weights"] = [i for i, _ in items], [w for _, w in items]
    return kw


def rect_mask(image, rect: str):
    import numpy as np
    import PIL.Image

    x, y, w, h = (int(v) for v in rect.split(","))
    if w < 1 or h < 1 or x + w > image.width or y + h > image.height:
        raise RecipeError("rect", f"{rect}: not a rectangle inside the {image.width}x{image.height} image")
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[y: y + h, x: x + w] = 255
    return PIL.Image.fromarray(mask)


def read_item(item: str, root: Path) -> tuple:
    """TEXT=WEIGHT or IMAGE=WEIGHT -> (prompt or image, weight)."""
    text, _, weight = item.rpartition("=")
    if Path(text).suffix.lower() not in IMAGE_SUFFIXES:
        return text, float(weight)
    return open_image(at(root, text), "RGB", "item", text), float(weight)


def native_size(folder: Path) -> tuple[int, int] | None:
    """(side, unit): the size a Kandinsky decoder was trained at (its UNet's sample size times the MoVQ's
    downscaling) and the step its sizes come in; None for other families."""
    from .config import read_json

    unet, movq = folder / "unet" / "config.json", folder / "movq" / "config.json"
    if not (unet.is_file() and movq.is_file()):
        return None
    unet = read_json(unet)
    sample, f = unet.get("sample_size"), 2 ** (len(read_json(movq)["block_out_channels"]) - 1)
    # Each UNet level halves the latents, which the MoVQ makes f times smaller than the image.
    unit = f * 2 ** (len(unet.get("block_out_channels", [0])) - 1)
    return (sample * f, unit) if isinstance(sample, int) else None


def default_size(task: str, folder: Path, inputs: dict) -> tuple[int, int] | None:
    """The model's native size; with an input image, its area at the image's aspect ratio (not the input's
    pixel size); a ControlNet hint gives its own size."""
    if "hint" in inputs and "image" not in inputs:
        return inputs["hint"].shape[3], inputs["hint"].shape[2]
    native = native_size(folder)
    if native is None:
        return None
    side, unit = native
    if "image" not in inputs or task not in ("img2img", "inpaint", "controlnet"):
        return side, side
    w, h = inputs["image"].size
    scale = side / math.sqrt(w * h)
    return tuple(max(unit, round(v * scale / unit) * unit) for v in (w, h))


# --------------------------------------------------------------------------------------------- the plan

def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def call_kwargs(recipe: Recipe, cls: type, base: type) -> tuple[dict, dict]:
    """(pipeline parameters, recipe values used): the parameters the recipe's options set, pipeline defaults
    filled in so the recipe is explicit. An option the model's pipelines do not take is an error."""
    known = {**defaults(base.__call__), **defaults(cls.__call__)}
    kw, used = {}, {}
    for option, names in OPTIONS.items():
        taken, value = [n for n in names if n in known], getattr(recipe, option)
        if value is not None and not taken:
            raise RecipeError(option, f"{base.__name__} has no such setting")
        values = (value[1], value[0]) if option == "size" and value else [value] * len(taken)
        kw.update({n: known[n] if v is None else v for n, v in zip(taken, values)})
        if taken:
            used[option] = (kw["width"], kw["height"]) if option == "size" else kw[taken[0]]
    return kw, used


def sampler_name(scheduler) -> str | None:
    """The short name of a scheduler object: its class and the config values the name sets."""
    from .schedulers import SAMPLERS

    config = dict(scheduler.config.items())
    return next((name for name, (cls, overrides) in SAMPLERS.items() if cls == type(scheduler).__name__
                 and all(config.get(k) == v for k, v in overrides.items())), None)


def check_sampler(name: str | None, base: type):
    from .schedulers import samplers_for, scheduler_for

    if name is None:
        return
    if name not in (allowed := samplers_for(base)):
        raise RecipeError("scheduler", f"{base.__name__} runs with {', '.join(allowed)}; got {name!r}")
    try:
        scheduler_for(name, {})
    except ValueError as error:
        raise RecipeError("scheduler", str(error).removeprefix("scheduler: ")) from None


def per_call(pipe, sampler: str | None):
    """A pipeline over the cached one's models with fresh schedulers (their per-call state is the call's
    own), the main stage's set to `sampler`; and the sampler's short name."""
    from .schedulers import scheduler_for

    slot = "scheduler" if "scheduler" in pipe.components else "decoder_scheduler"
    fresh = {n: type(s).from_config(s.config) for n, s in pipe.components.items()
             if hasattr(s, "set_timesteps")}
    if sampler is not None:
        fresh[slot] = scheduler_for(sampler, pipe.components[slot].config)
    return type(pipe).from_pipe(pipe, **fresh), sampler or sampler_name(fresh[slot])


def prepare(recipe: Recipe, models: Models, root: Path | str | None = None,
            images: dict | None = None) -> Job:
    """Everything that can fail before a model runs: inputs read, the model's pipeline found, options checked,
    the pipeline loaded (or taken from `models`) and derived for this call."""
    from .loading import builtin
    from .pipelines.auto import pipeline_class

    root = Path(root if root is not None else ".")
    check_device(recipe.device)
    inputs = read_inputs(recipe, root, images or {})
    folder = locate(recipe.model, root)
    if builtin(folder) is not None:
        recipe = recipe.replace(**{k: v for k, v in DEMO_DEFAULTS.items() if getattr(recipe, k) is None})
    saved = pipeline_name(folder)
    cls = pipeline_class(saved, "controlnet_img2img" if recipe.task == "controlnet" and recipe.image
                         else recipe.task)
    # A decoder takes embeddings: the family's text-to-image pipeline loads, for its prior.
    base = pipeline_class(saved, "text2img") if "image_embeds" in inspect.signature(cls.__call__).parameters \
        else cls
    size = recipe.size or (default_size(recipe.task, folder, inputs) if "height" in defaults(cls.__call__)
                           else None)
    kw, used = call_kwargs(recipe.replace(size=size), cls, base)
    check_sampler(recipe.scheduler, base)
    pipe, sampler = per_call(models.pipeline(folder, base, recipe.dtype, recipe.device), recipe.scheduler)
    if recipe.deepcache is not None and not pipe.models_with("enable_deepcache"):
        raise RecipeError("deepcache", f"{base.__name__} has no UNet2DConditionModel decoder for DeepCache")
    used.update(scheduler=sampler, dtype=str(pipe.dtype).removeprefix("torch."), device=str(pipe.device))
    return Job(recipe.replace(**used), pipe, cls, {**kw, **inputs})


# --------------------------------------------------------------------------------------------- running

@dataclass(frozen=True)
class Result:
    recipe: Recipe  # as used: this image's seed, n=1, defaults filled in
    image: Any  # a PIL image
    seconds: float

    def png(self) -> bytes:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in png_text(self.recipe).items():
            info.add_itxt(key, value)
        out = io.BytesIO()
        self.image.save(out, "png", pnginfo=info)
        return out.getvalue()


@dataclass(frozen=True)
class Job:
    """A prepared recipe: its pipeline for this call and the parameters; `make(seed)` makes one image."""

    recipe: Recipe  # as used, defaults filled in; seed as asked (None: random)
    pipe: Any
    cls: type
    kwargs: dict

    def seeds(self) -> range:
        seed = self.recipe.seed if self.recipe.seed is not None else random.randrange(2**32)
        return range(seed, seed + self.recipe.n)

    def make(self, seed: int, on_step: OnStep | None = None, cancel: threading.Event | None = None) -> Result:
        import torch

        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled before it started")
        start, r = time.perf_counter(), self.recipe
        decoder = min(int(r.steps * r.strength), r.steps) if r.steps and r.strength is not None else r.steps
        totals = {"prior": r.prior_steps, "decoder": decoder, "super_res": r.super_res_steps,
                  "upscale": r.steps}
        kw = {**self.kwargs, "generator": torch.Generator().manual_seed(seed),
              "prior_callback_on_step_end": step_hook("prior", totals, on_step, cancel),
              "callback_on_step_end": step_hook("upscale" if r.task == "upscale" else "decoder", totals,
                                                on_step, cancel)}
        with self.pipe.deepcache(r.deepcache):  # this job's own, not the UNet's shared setting (None: off)
            image = images_for(self.pipe, self.cls, kw)[0]
        return Result(r.replace(seed=seed, n=1), image, time.perf_counter() - start)


def step_hook(stage: str, totals: dict, on_step: OnStep | None, cancel: threading.Event | None):
    """A pipeline's step-end callback: progress as (stage, step, total), then the cancel check."""
    def hook(pipe, i, t, tensors):
        name = getattr(pipe, "stage", None) or stage  # unCLIP names its own stages
        if on_step is not None:
            on_step(name, i + 1, max(totals.get(name) or 0, i + 1))
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled at {name} step {i + 1}")
        return {}

    return hook


def images_for(pipe, cls: type, kw: dict) -> list:
    """One run of the task's pipeline; a decoder first gets its embeddings from the prior (or from the
    prior's interpolation of weighted prompts and images)."""
    from .pipelines.core import call_args

    if isinstance(pipe, cls):
        return pipe(**call_args(pipe.__call__, kw)).images
    prior = pipe.prior_pipe
    embed = prior.interpolate if "images_and_prompts" in kw else prior
    prior_kw = {**kw, **{k[6:]: v for k, v in kw.items() if k.startswith("prior_")}}
    out = embed(**call_args(embed, {k: v for k, v in prior_kw.items() if v is not None}))
    decoder = cls.from_pipe(pipe)
    embeds = {"image_embeds": out.image_embeds, "negative_image_embeds": out.negative_image_embeds}
    return decoder(**call_args(decoder.__call__, {**kw, **embeds})).images


def run(recipe: Recipe, models: Models, on_step: OnStep | None = None, cancel: threading.Event | None = None,
        root: Path | str | None = None, images: dict | None = None) -> list[Result]:
    """The images of a recipe, one per seed (seed, seed + 1, ...)."""
    job = prepare(recipe, models, root, images)
    return [job.make(seed, on_step, cancel) for seed in job.seeds()]
