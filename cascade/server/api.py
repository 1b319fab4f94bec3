"""Translation tables: an AUTOMATIC1111, OpenAI or cascade request -> recipe fields (and the images it
carries), and finished images -> that API's response. Nothing here runs a model; the recipe's own checks
(cascade.recipe) run before anything is queued, their errors named by the request's field names."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from ..recipe import A1111_SAMPLERS as OURS_TO_A1111
from ..recipe import TASK_ALIASES, Recipe, RecipeError
from .errors import ApiError, invalid
from .images import Limits, from_base64, mask_from_alpha, open_image

A1111_SAMPLERS = {**{v: k for k, v in OURS_TO_A1111.items()}, "DPM++ SDE": "dpm++sde"}
# What an uploaded image is called in a recipe: the job layer takes the pixels in memory, never a path.
UPLOADED = {"image": "(uploaded image)", "mask": "(uploaded mask)"}
# The tasks a request can ask for and the images each carries.
TASK_INPUTS = {"text2img": (), "img2img": ("image",), "inpaint": ("image", "mask"), "variation": ("image",),
               "upscale": ("image",)}


@dataclass(frozen=True)
class Served:
    """What one served model can do, for validation and for the model lists of the APIs and the page."""
    name: str
    pipeline: str  # the saved pipeline class, e.g. KandinskyV22CombinedPipeline
    tasks: tuple  # of TASK_INPUTS keys
    samplers: tuple  # our sampler names; the first is the model's own
    size: tuple | None  # (width, height) the model makes by default
    settings: tuple  # the recipe settings it takes: steps, prior_steps, guidance, prior_guidance, strength...
    unit: int | None = None  # output sides must be multiples of this (None: the pipeline checks)

    def describe(self) -> dict:
        return {"name": self.name, "pipeline": self.pipeline, "tasks": list(self.tasks),
                "samplers": list(self.samplers), "size": list(self.size) if self.size else None,
                "settings": list(self.settings), "size_multiple": self.unit}


@dataclass
class Request:
    """A translated request: recipe fields, the images it carried, and the request's name for each field."""
    model: Served
    fields: dict
    inputs: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)  # recipe key -> the request's field name

    def recipe(self, limits: Limits) -> Recipe:
        """The recipe, checked by its own rules and then the server's limits; a bad value is a 422 that names
        the field as the request named it."""
        try:
            fields = {**self.fields, **{k: UPLOADED[k] for k in self.inputs}}
            recipe = Recipe.from_dict({k: v for k, v in fields.items() if v is not None})
        except RecipeError as error:
            raise invalid(self.names.get(error.field, error.field), str(error).split(": ", 1)[1]) from None
        within(recipe, self.model, self.names, limits)
        return recipe


# --------------------------------------------------------------------------------------------- field checks

def number(name, value, kind=int):
    """A JSON number (or numeric text from a form) as `kind`; ranges are the recipe's to check."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid(name, f"expected a number, got {json.dumps(value)[:40]}")
    if kind is int and not float(value).is_integer():
        raise invalid(name, f"expected an integer, got {value}")
    return kind(value)


def seed(name, value):
    """-1, "" or null: a random seed, drawn when the job runs and reported back."""
    return None if value in (None, -1, "", "-1") else number(name, value)


def text(name, value):
    if value is not None and not isinstance(value, str):
        raise invalid(name, f"expected a string, got {json.dumps(value)[:40]}")
    return value


def convert(name, value, kind):
    """A request's value as the recipe wants it: kind "seed" (-1: random), "size" ("WxH"), int, float, or
    None for text."""
    if kind == "seed":
        return seed(name, value)
    if kind == "size":
        return openai_size(value)
    if value is None or kind is None:
        return text(name, value)
    return number(name, value, kind)


def translate(values: dict, table: dict, kinds: dict) -> dict:
    """A request's fields -> recipe fields, through a table of {request name: recipe key}."""
    return {key: convert(name, values.get(name), kinds.get(name)) for name, key in table.items()}


def choose(name, value, served: dict):
    if value not in served:
        raise ApiError(404, name, f"{json.dumps(value)[:60]} is not served here; models: {sorted(served)}")
    return served[value]


def sampler(name, value, model: Served):
    ours = A1111_SAMPLERS.get(value, value.lower() if isinstance(value, str) else value)
    if ours not in model.samplers:
        known = [OURS_TO_A1111.get(s, s) for s in model.samplers]
        raise invalid(name, f"{model.name} runs the samplers {known}, not {json.dumps(value)[:40]}")
    return ours


def wants(model: Served, task: str, name: str):
    if task not in model.tasks:
        raise invalid(name, f"{model.name} ({model.pipeline}) cannot run {task}; it runs {list(model.tasks)}")


def within(recipe: Recipe, model: Served, names: dict, limits: Limits) -> None:
    """The server's own limits (tighter than the recipe's), and settings the model does not take."""
    for key in ("steps", "prior_steps", "super_res_steps", "guidance", "prior_guidance", "strength"):
        value = getattr(recipe, key)
        if value is not None and key not in model.settings:
            takes = list(model.settings)
            raise invalid(names.get(key, key), f"{model.name} has no such setting; it takes {takes}")
        if value is not None and key.endswith("steps") and value > limits.steps:
            raise invalid(names.get(key, key), f"expected an integer from 1 to {limits.steps}, got {value}")
    if recipe.n > limits.images:
        raise invalid(names.get("n", "n"), f"at most {limits.images} images per request, got {recipe.n}")
    if recipe.size and not all(8 <= side <= limits.side and side % (model.unit or 1) == 0
                               for side in recipe.size):
        multiple = f", multiples of {model.unit}" if model.unit else ""
        raise invalid(names.get("size", "size"), f"each side from 8 to {limits.side} pixels{multiple}, got "
                      "{}x{}".format(*recipe.size))


# --------------------------------------------------------------------------------------------- AUTOMATIC1111

A1111_FIELDS = {"prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "cfg_scale": "guidance",
                "prior_steps": "prior_steps", "prior_cfg_scale": "prior_guidance", "seed": "seed",
                "denoising_strength": "strength"}
A1111_KINDS = {"steps": int, "prior_steps": int, "cfg_scale": float, "prior_cfg_scale": float,
               "denoising_strength": float, "seed": "seed"}


def a1111_request(body: dict, served: dict, current: str, limits: Limits, img2img: bool) -> Request:
    """/sdapi/v1/txt2img or img2img JSON -> a Request. Fields AUTOMATIC1111 has and we do not (hires fix,
    restore faces, scripts...) are ignored as it ignores unknown ones: clients send their whole form."""
    override = body.get("override_settings") or {}
    if not isinstance(override, dict):
        raise invalid("override_settings", "expected an object")
    checkpoint = override.get("sd_model_checkpoint")
    model = choose("override_settings.sd_model_checkpoint", checkpoint, served) if checkpoint else \
        served[current]
    task = ("inpaint" if body.get("mask") else "img2img") if img2img else "text2img"
    wants(model, task, "mask" if task == "inpaint" else "init_images" if img2img else "model")
    fields = translate({**body, "prompt": body.get("prompt", "")}, A1111_FIELDS, A1111_KINDS)
    if task != "img2img" or "strength" not in model.settings:
        fields.pop("strength")  # every client sends it; here only image to image takes it
    batches = number("n_iter", body.get("n_iter") or 1)
    fields.update(model=model.name, task=task, n=number("batch_size", body.get("batch_size") or 1) * batches)
    request = Request(model, fields, names={v: k for k, v in A1111_FIELDS.items()})
    request.names.update(n="batch_size", size="width", image="init_images")
    if body.get("width") or body.get("height"):
        width, height = model.size or (512, 512)
        request.fields["size"] = (number("width", body.get("width") or width),
                                  number("height", body.get("height") or height))
    if name := body.get("sampler_name") or body.get("sampler_index"):
        karras = body.get("scheduler") == "Karras" and f"{name} Karras" in A1111_SAMPLERS
        request.fields["scheduler"] = sampler("sampler_name", f"{name} Karras" if karras else name, model)
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or not images:
            raise invalid("init_images", "expected a list with one base64-encoded image")
        request.inputs["image"] = open_image(from_base64(images[0], "init_images", limits), "init_images",
                                             limits)
        if task == "inpaint":
            mask = from_base64(body["mask"], "mask", limits)
            request.inputs["mask"] = open_image(mask, "mask", limits, "L")
    return request


def a1111_info(results: list, model: str) -> dict:
    """The JSON that AUTOMATIC1111 returns as the string `info`: seeds, prompts, settings, infotexts."""
    first, seeds = results[0], [r["seed"] for r in results]
    width, height = first["size"]
    return {"prompt": first.get("prompt") or "", "all_prompts": [r.get("prompt") or "" for r in results],
            "negative_prompt": first.get("negative") or "",
            "all_negative_prompts": [r.get("negative") or "" for r in results],
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
            "width": width, "height": height, "steps": first.get("steps"), "cfg_scale": first.get("guidance"),
            "sampler_name": OURS_TO_A1111.get(first.get("scheduler"), first.get("scheduler")),
            "batch_size": len(results), "sd_model_name": model, "sd_model_hash": None,
            "infotexts": [r["parameters"] for r in results], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "version": "cascade"}


def a1111_response(body: dict, results: list, model: str) -> dict:
    """`images` base64 PNGs, `parameters` the request echoed (without its images), `info` a JSON string."""
    echoed = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    return {"images": [r["b64"] for r in results], "parameters": echoed,
            "info": json.dumps(a1111_info(results, model))}


def a1111_models(served: dict) -> list:
    return [{"title": m.name, "model_name": m.name, "hash": None, "sha256": None, "filename": m.name,
             "config": None} for m in served.values()]


def a1111_samplers(served: dict) -> list:
    names = dict.fromkeys(s for m in served.values() for s in m.samplers)
    return [{"name": OURS_TO_A1111.get(s, s), "aliases": [s], "options": {}} for s in names]


def a1111_png_info(text: dict, fields: dict) -> dict:
    """/sdapi/v1/png-info: the infotext, the other text chunks, and the infotext parsed."""
    return {"info": text.get("parameters", ""), "items": {k: v for k, v in text.items() if k != "parameters"},
            "parameters": fields}


# --------------------------------------------------------------------------------------------- OpenAI

OPENAI_FIELDS = {"prompt": "prompt", "negative_prompt": "negative", "seed": "seed", "steps": "steps",
                 "prior_steps": "prior_steps", "guidance_scale": "guidance",
                 "prior_guidance_scale": "prior_guidance", "strength": "strength", "n": "n", "size": "size"}
OPENAI_KINDS = {"steps": int, "prior_steps": int, "n": int, "guidance_scale": float,
                "prior_guidance_scale": float, "strength": float, "seed": "seed", "size": "size"}


def openai_size(value):
    if value in (None, "", "auto"):
        return None
    w, sep, h = value.lower().partition("x") if isinstance(value, str) else ("", "", "")
    if not (sep and w.isdigit() and h.isdigit()):
        raise invalid("size", f"expected WIDTHxHEIGHT such as 512x512, or auto, got {json.dumps(value)[:40]}")
    return int(w), int(h)


def openai_request(values: dict, served: dict, current: str, limits: Limits, task: str) -> Request:
    """/v1/images/generations (JSON), /edits and /variations (multipart) -> a Request; `negative_prompt`,
    `seed`, `steps` and our other settings are extensions. An unknown model name ("dall-e-2", what clients
    send by default) means the current model."""
    model = served.get(values.get("model")) or served[current]
    if values.get("response_format") not in (None, "b64_json", "url"):
        given = json.dumps(values["response_format"])[:40]
        raise invalid("response_format", f"expected b64_json or url, got {given}")
    if values.get("output_format") not in (None, "png"):
        raise invalid("output_format", "only png is made here")
    if task != "variation" and not values.get("prompt"):
        raise invalid("prompt", "expected a non-empty string")
    fields = translate(values, OPENAI_FIELDS, OPENAI_KINDS)
    fields.update(model=model.name, task=task, n=1 if fields["n"] is None else fields["n"])
    request = Request(model, fields, names={v: k for k, v in OPENAI_FIELDS.items()})
    if task != "text2img":
        openai_images(request, values, model, limits)
    wants(model, request.fields["task"], "image" if task != "text2img" else "model")
    return request


def openai_images(request: Request, values: dict, model: Served, limits: Limits) -> None:
    """An edit with a mask (or an image with transparent pixels) is inpainting, else image to image; a
    variation of a model without a variation pipeline is image to image with no prompt."""
    if not isinstance(values.get("image"), bytes):
        raise invalid("image", "expected an image file in multipart/form-data")
    image = open_image(values["image"], "image", limits, None)
    fields = request.fields
    if fields["task"] == "edit":
        mask = values.get("mask")
        mask = mask_from_alpha(open_image(mask, "mask", limits, None) if isinstance(mask, bytes) else image)
        fields["task"] = "img2img" if mask is None else "inpaint"
        request.inputs.update({} if mask is None else {"mask": mask})
    elif "variation" not in model.tasks and "img2img" in model.tasks:
        fields.update(task="img2img", prompt="", strength=fields.get("strength") or 0.75)
    request.inputs["image"] = image.convert("RGB")


def openai_response(results: list, fmt: str | None, url_of) -> dict:
    key = "url" if fmt == "url" else "b64_json"
    return {"created": int(time.time()), "data": [{key: url_of(i) if key == "url" else r["b64"],
                                                   "revised_prompt": None} for i, r in enumerate(results)]}


def openai_models(served: dict) -> dict:
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "cascade"}
                                       for m in served.values()]}


# --------------------------------------------------------------------------------------------- our own

OWN_FIELDS = ("model", "task", "prompt", "negative", "seed", "n", "size", "scheduler", "steps", "prior_steps",
              "guidance", "prior_guidance", "strength", "image", "mask")


def own_request(body: dict, served: dict, current: str, limits: Limits) -> Request:
    """The page's job request: recipe keys as the CLI and PNGs name them; images as base64 or data: URLs."""
    if unknown := sorted(set(body) - set(OWN_FIELDS)):
        raise invalid(unknown[0], f"not a field here; expected some of {list(OWN_FIELDS)}")
    model = choose("model", body.get("model") or current, served)
    task = TASK_ALIASES.get(body.get("task"), body.get("task") or "text2img")
    if task not in TASK_INPUTS:
        raise invalid("task", f"expected one of {list(TASK_INPUTS)}, got {json.dumps(task)[:40]}")
    wants(model, task, "task")
    fields = {k: v for k, v in body.items() if k not in ("image", "mask")}
    fields.update(model=model.name, task=task, seed=seed("seed", body.get("seed")), n=body.get("n") or 1)
    if fields.get("scheduler"):
        fields["scheduler"] = sampler("scheduler", fields["scheduler"], model)
    request = Request(model, fields)
    for name in TASK_INPUTS[task]:
        if not body.get(name):
            raise invalid(name, f"{task} needs an {name} (base64 or a data: URL)")
        mode = "L" if name == "mask" else "RGB"
        request.inputs[name] = open_image(from_base64(body[name], name, limits), name, limits, mode)
    return request
