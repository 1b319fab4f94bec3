"""Recipes (what makes a set of images again), the PNGs that carry them and the files they go to; the
running half of the job layer is cascade/jobs.py, which re-exports all of this."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__

TASKS = ("text2img", "img2img", "inpaint", "controlnet", "variation", "interpolate", "upscale")
# The command line's names for tasks, as PNGs made before the job layer record them.
TASK_ALIASES = {"generate": "text2img", "variations": "variation"}
PROMPTED = ("text2img", "img2img", "inpaint", "controlnet", "upscale")
# The inputs each task reads; "mask|rect" is one of the two, "image?" optional.
TASK_INPUTS = {"text2img": (), "img2img": ("image",), "inpaint": ("image", "mask|rect"),
               "controlnet": ("hint", "image?"), "variation": ("image",), "interpolate": ("item",),
               "upscale": ("image",)}
DTYPES = ("float32", "float16", "bfloat16")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_STEPS = 1000  # the training schedules' num_train_timesteps
MAX_SIDE = 8192
MAX_IMAGES = 100
MAX_INPUT_PIXELS = 8192 * 8192
# Recipe field -> the pipeline parameters it sets: whichever the model's pipeline takes.
OPTIONS = {
    "negative": ("negative_prompt",), "steps": ("num_inference_steps", "decoder_num_inference_steps"),
    "prior_steps": ("prior_num_inference_steps",), "super_res_steps": ("super_res_num_inference_steps",),
    "guidance": ("guidance_scale", "decoder_guidance_scale"), "prior_guidance": ("prior_guidance_scale",),
    "strength": ("strength",), "size": ("height", "width"),
}
# Settings a recipe for the built-in demo model gets when it leaves them unset: the fastest setting within 2
# points of the pipeline's defaults (100 DDPM steps) on all three scores over benchmarks/samplers.py's 200
# captions (99.5 / 100 / 81.0 % against 99.5 / 100 / 83.0 %). `deepcache=1` runs every step whole.
DEMO_DEFAULTS: dict[str, Any] = {"scheduler": "dpm++sde", "steps": 20, "deepcache": 3}
# Short sampler name -> AUTOMATIC1111's name for it (its "Sampler:" field and /sdapi/v1/samplers).
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++2m": "DPM++ 2M", "dpm++2m-karras": "DPM++ 2M Karras",
                  "dpm++sde": "DPM++ 2M SDE", "unipc": "UniPC", "euler": "Euler", "euler-a": "Euler a",
                  "heun": "Heun", "unclip": "unCLIP", "wuerstchen": "Wuerstchen"}


class RecipeError(ValueError):
    """A recipe field with a value it cannot take; `field` names it (the CLI shows it as --field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Cancelled(Exception):
    """A run stopped by its `cancel` event."""


# --------------------------------------------------------------------------------------------- the recipe

def _int(field, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecipeError(field, f"expected an integer in {low}..{high}, got {value!r}")
    return value


def _float(field, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RecipeError(field, f"expected a finite number in {low}..{high}, got {value!r}")
    return float(value)


def _text(field, value):
    if not isinstance(value, str):
        raise RecipeError(field, f"expected a string, got {value!r}")
    return value


def _name(field, value):
    if not _text(field, value).strip():
        raise RecipeError(field, "expected a folder, a Hub repo id or demo, got an empty name")
    return value


def parse_size(text: str, field: str = "size") -> tuple[int, int]:
    """"WxH" (or "N" for NxN) -> (width, height)."""
    w, _, h = str(text).lower().partition("x")
    if not (w.isdigit() and (h or w).isdigit()):
        raise RecipeError(field, f"expected WIDTHxHEIGHT such as 512x768, got {text!r}")
    return int(w), int(h or w)


def _size(field, value):
    value = parse_size(value, field) if isinstance(value, str) else value
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise RecipeError(field, f"expected WIDTHxHEIGHT such as 512x768, got {value!r}")
    w, h = (_int(field, v, 1, MAX_SIDE) for v in value)
    return w, h


def _items(field, value):
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise RecipeError(field, f"expected a list of TEXT=WEIGHT or IMAGE=WEIGHT, got {value!r}")
    for item in value:
        text, sep, weight = _text(field, item).rpartition("=")
        try:
            ok = bool(sep and text) and math.isfinite(float(weight))
        except ValueError:
            ok = False
        if not ok:
            raise RecipeError(field, f"expected TEXT=WEIGHT or IMAGE=WEIGHT, a finite weight, got {item!r}")
    return tuple(value)


def _rect(field, value):
    parts = _text(field, value).split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise RecipeError(field, f"expected X,Y,W,H in pixels, got {value!r}")
    return value


def _choice(choices):
    def check(field, value):
        if value not in choices:
            raise RecipeError(field, f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return check


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dtype(field, value):
    return _choice(DTYPES)(field, DTYPE_ALIASES.get(value, value))


def _scheduler(field, value):
    from .schedulers import SAMPLERS

    return _choice(tuple(SAMPLERS))(field, value)


# field -> its check (returns the value normalised); None values skip the check.
CHECKS: dict[str, Callable] = {
    "model": _name, "task": _choice(TASKS), "prompt": _text, "negative": _text,
    "seed": lambda f, v: _int(f, v, 0, MAX_SEED), "steps": lambda f, v: _int(f, v, 1, MAX_STEPS),
    "prior_steps": lambda f, v: _int(f, v, 1, MAX_STEPS),
    "super_res_steps": lambda f, v: _int(f, v, 1, MAX_STEPS),
    "guidance": lambda f, v: _float(f, v, 0, 100), "prior_guidance": lambda f, v: _float(f, v, 0, 100),
    "strength": lambda f, v: _float(f, v, 0, 1), "size": _size, "scheduler": _scheduler,
    "deepcache": lambda f, v: _int(f, v, 1, MAX_STEPS), "dtype": _dtype, "device": _text,
    "image": _text, "mask": _text, "rect": _rect, "hint": _text, "item": _items,
    "n": lambda f, v: _int(f, v, 1, MAX_IMAGES),
}
INTS = ("seed", "steps", "prior_steps", "super_res_steps", "deepcache", "n")
FLOATS = ("guidance", "prior_guidance", "strength")


@dataclass(frozen=True)
class Recipe:
    """Everything that makes a set of images again; None means the pipeline's default (recorded as used)."""

    model: str
    task: str = "text2img"
    prompt: str | None = None
    negative: str | None = None
    seed: int | None = None
    steps: int | None = None
    prior_steps: int | None = None
    super_res_steps: int | None = None
    guidance: float | None = None
    prior_guidance: float | None = None
    strength: float | None = None
    size: tuple[int, int] | None = None  # (width, height)
    scheduler: str | None = None  # a key of cascade.schedulers.SAMPLERS
    deepcache: int | None = None  # DeepCache's cache interval
    dtype: str | None = None
    device: str | None = None
    image: str | None = None
    mask: str | None = None
    rect: str | None = None
    hint: str | None = None
    item: tuple[str, ...] | None = None
    n: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name == "model":
                object.__setattr__(self, f.name, CHECKS[f.name](f.name, value))
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise RecipeError("seed", f"seed + n - 1 must be at most {MAX_SEED}, got {self.seed} + {self.n} "
                                      "- 1")
        self._check_inputs()

    def _check_inputs(self):
        needs = TASK_INPUTS[self.task]
        if self.task in PROMPTED and self.prompt is None:
            raise RecipeError("prompt", f"{self.task} needs a prompt")
        for name in ("image", "mask", "rect", "hint", "item"):
            given, wanted = getattr(self, name) is not None, [n for n in needs if name in n.split("|")
                                                              or n == name + "?"]
            if given and not wanted:
                raise RecipeError(name, f"{self.task} takes no {name}")
            if not given and name in needs:
                raise RecipeError(name, f"{self.task} needs an {name}" if name[0] in "aeiou"
                                  else f"{self.task} needs a {name}")
        if "mask|rect" in needs and (self.mask is None) == (self.rect is None):
            raise RecipeError("mask", "inpaint needs one of mask or rect")

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON values, None left out: size as "WxH", item as a list, n only when not 1."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "n" and value == 1):
                continue
            out[f.name] = "{}x{}".format(*value) if f.name == "size" else list(value) if f.name == "item" \
                else value
        return out

    @classmethod
    def from_dict(cls, values: dict, defaults: dict | None = None) -> Recipe:
        """A JSON object (an HTTP request, a JSONL line) over `defaults`; unknown keys are an error."""
        if not isinstance(values, dict):
            raise RecipeError("recipe", f"expected a JSON object, got {type(values).__name__}")
        merged = {**(defaults or {}), **values}
        unknown = sorted(set(merged) - set(CHECKS))
        if unknown:
            raise RecipeError(unknown[0], f"not a recipe key; expected some of {', '.join(CHECKS)}")
        if "task" in merged:
            merged["task"] = TASK_ALIASES.get(merged["task"], merged["task"])
        if "model" not in merged:
            raise RecipeError("model", "missing")
        return cls(**merged)

    @classmethod
    def from_png(cls, source) -> Recipe:
        """The recipe a PNG made by cascade carries (a path, bytes or an opened image)."""
        text = read_png(source)
        name = source if isinstance(source, (str, Path)) else "the image"
        if "cascade" not in text or "model" not in text or "task" not in text:
            raise ValueError(f"{name}: holds no cascade recipe")
        return cls.from_dict(recipe_values(text))


def recipe_values(text: dict[str, str]) -> dict[str, Any]:
    """PNG text chunks -> recipe values (numbers parsed, item decoded), other chunks left out."""
    out: dict[str, Any] = {}
    for key, value in text.items():
        if key not in CHECKS:
            continue
        try:
            out[key] = int(value) if key in INTS else float(value) if key in FLOATS else \
                json.loads(value) if key == "item" else value
        except ValueError:
            raise RecipeError(key, f"unreadable value {value!r} in the PNG's recipe") from None
    return out


# --------------------------------------------------------------------------------------------- PNGs

def png_text(recipe: Recipe) -> dict[str, str]:
    """The text chunks of a PNG: cascade's recipe (strings as they are, other values as JSON) and the
    AUTOMATIC1111-style `parameters`."""
    values = {"task": recipe.task, "cascade": __version__, **recipe.to_dict()}
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items() if k != "n"}
    return {**text, "parameters": parameters(recipe)}


def parameters(recipe: Recipe) -> str:
    """AUTOMATIC1111's infotext: prompt, `Negative prompt:` line, then `Key: value` pairs."""
    number = lambda x: f"{x:g}"  # noqa: E731 - A1111 writes 4 and 7.5
    fields = {"Steps": recipe.steps, "Sampler": A1111_SAMPLERS.get(recipe.scheduler, recipe.scheduler),
              "CFG scale": None if recipe.guidance is None else number(recipe.guidance), "Seed": recipe.seed,
              "Size": recipe.size and "{}x{}".format(*recipe.size), "Model": recipe.model,
              "Denoising strength": None if recipe.strength is None else number(recipe.strength),
              "Prior steps": recipe.prior_steps,
              "Prior CFG scale": None if recipe.prior_guidance is None else number(recipe.prior_guidance),
              "Super-res steps": recipe.super_res_steps, "DeepCache interval": recipe.deepcache,
              "Task": recipe.task, "Version": f"cascade {__version__}"}
    pairs = ", ".join(f"{k}: {quote(str(v))}" for k, v in fields.items() if v is not None)
    negative = [f"Negative prompt: {recipe.negative}"] if recipe.negative else []
    return "\n".join([recipe.prompt or "", *negative, pairs])


def quote(text: str) -> str:
    return json.dumps(text) if any(c in text for c in ',:\n"') else text


def parse_parameters(text: str) -> dict[str, str]:
    """AUTOMATIC1111's infotext -> {"prompt", "negative_prompt", and each `Key: value` of its last line}."""
    import re

    lines = text.strip().split("\n")
    pairs = re.findall(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', lines[-1])
    if len(pairs) < 3:  # no settings line: all of it is the prompt
        pairs, lines = [], lines + [""]
    prompt, negative = [], []
    for line in lines[:-1]:
        (negative if negative or line.startswith("Negative prompt:") else prompt).append(line)
    negative_prompt = "\n".join(negative).removeprefix("Negative prompt:").strip()
    out = {"prompt": "\n".join(prompt), "negative_prompt": negative_prompt}
    return out | {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def read_png(source) -> dict[str, str]:
    """The text chunks of an image (a path, bytes or an opened image); a ValueError if it is no image."""
    if hasattr(source, "info"):
        return {k: v for k, v in source.info.items() if isinstance(v, str)}
    image = open_image(source, None, "image")
    return {k: v for k, v in image.info.items() if isinstance(v, str)}


def open_image(source, mode: str | None = "RGB", field: str = "image", name: str | None = None):
    """An image from a path or bytes, pixels bounded before they decode; 16-bit and integer greyscale scaled
    by their real range, not clipped."""
    import numpy as np
    import PIL.Image

    name = name or (source if isinstance(source, (str, Path)) else "the image")
    try:
        image = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ValueError(f"{field} {name}: {image.width}x{image.height} is over the "
                             f"{MAX_INPUT_PIXELS // 10**6} megapixel limit")
        image.load()
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{field} {name}: too many pixels ({error})") from None
    except (OSError, SyntaxError, PIL.UnidentifiedImageError):
        path = Path(source) if isinstance(source, (str, Path)) else None
        what = "not an image" if path is None or path.is_file() else "a folder, not an image" if path.is_dir() \
            else "no such file"
        raise ValueError(f"{field} {name}: {what}") from None
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        x = np.asarray(image, np.float64)
        top = 65535 if image.mode.startswith("I;16") else max(float(x.max()), 1.0)
        image = PIL.Image.fromarray((np.clip(x / top, 0, 1) * 255).round().astype(np.uint8), "L")
    return image if mode is None else image.convert(mode)


# --------------------------------------------------------------------------------------------- files

def write_new(folder: Path, stem: str, data: bytes, overwrite: bool = False, suffix: str = ".png") -> Path:
    """Write `data` as folder/stem.png atomically (a temporary file in the folder, then a rename): under a new
    name (stem-1, stem-2, ...) if the name is taken, unless `overwrite`. A symlink is replaced, never written
    through; concurrent writers never take the same name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for k in range(10**6):
            path = folder / (f"{stem}{suffix}" if k == 0 else f"{stem}-{k}{suffix}")
            if overwrite:
                os.replace(temporary, path)
                return path
            try:
                os.link(temporary, path)  # fails if the name exists, even as a dangling symlink
            except FileExistsError:
                continue
            return path
        raise FileExistsError(f"{folder}: no free name for {stem}{suffix}")
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def check_folder(folder: Path, field: str = "out") -> Path:
    """An output folder that exists or can be made: not a file, not a dangling symlink."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        what = "a dangling symlink" if folder.is_symlink() and not folder.exists() else "not a folder"
        raise RecipeError(field, f"{folder} is {what}")
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise RecipeError(field, f"{folder}: cannot write there ({parent} is not a writable folder)")
    return folder


def at(root: Path | str, path: str) -> Path:
    """`path` read from `root`, `..` taken lexically, as `rebase` wrote it (the root may not exist yet)."""
    return Path(os.path.normpath(Path(root) / path))


def rebase(recipe: Recipe, source: Path | str, target: Path | str) -> Recipe:
    """Relative input paths (and a relative model folder) read from `source` re-expressed relative to
    `target`; absolute paths, Hub ids and texts stay as they are."""
    source, target = Path(source), Path(target)

    def move(path: str) -> str:
        if Path(path).is_absolute() or not os.path.lexists(source / path):
            return path
        return os.path.relpath(os.path.abspath(source / path), os.path.abspath(target))

    def move_item(item: str) -> str:
        text, _, weight = item.rpartition("=")
        return f"{move(text)}={weight}" if Path(text).suffix.lower() in IMAGE_SUFFIXES else item

    changes = {k: move(v) for k in ("model", "image", "mask", "hint")
               if (v := getattr(recipe, k)) is not None}
    if recipe.item is not None:
        changes["item"] = tuple(map(move_item, recipe.item))
    return recipe.replace(**changes)

