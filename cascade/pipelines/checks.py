"""Every pipeline's arguments checked by name before any model runs, and its outputs checked for NaN.

`checked(call)` wraps each `__call__` (see offload.OffloadMixin): unknown keyword arguments, step counts,
guidance scales, strength, sizes, counts, prompts, non-finite tensors, a hint the UNet cannot take, and a
memory estimate; integer and 16-bit images are rescaled to what the pipelines read. Checks go by parameter
name, so one table serves all sixteen pipelines and their combinations.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from typing import Any

import numpy as np
import PIL.Image
import torch

# Keyword arguments the reference's `**kwargs` take (deprecated callbacks); anything else is a mistake.
LEGACY = {"callback", "callback_steps", "prior_callback", "prior_callback_steps"}
STEPS = {"num_inference_steps": "scheduler", "prior_num_inference_steps": "prior_scheduler",
         "decoder_num_inference_steps": "decoder_scheduler",
         "super_res_num_inference_steps": "super_res_scheduler"}
MAX_STEPS = 10_000  # for continuous schedules (Würstchen), which have no num_train_timesteps to bound them
GUIDANCE = ("guidance_scale", "prior_guidance_scale", "decoder_guidance_scale")
TENSORS = ("image_embeds", "negative_image_embeds", "latents", "prior_latents", "decoder_latents",
           "super_res_latents", "prompt_embeds", "negative_prompt_embeds", "image_embeddings",
           "text_model_output", "image", "hint", "mask_image")
IMAGES = ("image", "hint", "mask_image")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def checked(call):
    """`call` (a pipeline's __call__) with its arguments checked and normalised first, its output after."""
    signature = inspect.signature(call)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(call)
    def run(self, *args, **kwargs):
        name = type(self).__name__
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{name}.__call__: {e}") from None
        unknown = sorted(set(bound.arguments.get(var_kw, {})) - LEGACY)
        if unknown:
            raise TypeError(f"{name}.__call__ got unexpected keyword argument(s) {unknown}")
        bound.apply_defaults()
        values = {k: v for k, v in list(bound.arguments.items())[1:] if k != var_kw}
        for key in IMAGES:
            if key in values and values[key] is not None:
                bound.arguments[key] = values[key] = rescaled(key, values[key])
        check_arguments(self, values)
        out = call(*bound.args, **bound.kwargs)
        return finite_output(name, out)

    return run


def check_arguments(pipe, args: dict[str, Any]) -> None:
    """Everything about a call that can be wrong without running a model; raises naming the argument."""
    for key, value in args.items():
        if key in STEPS:
            check_steps(key, value, getattr(pipe, STEPS[key], None))
        elif key in GUIDANCE:
            real(key, value)
        elif key == "strength":
            if not 0 <= real(key, value) <= 1:
                raise ValueError(f"strength must be in [0, 1], got {value}")
        elif key == "num_images_per_prompt":
            count(key, value)
        elif key in TENSORS and value is not None:
            finite(key, value)
    if args.get("output_type", "pil") not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {args['output_type']!r}")
    check_prompts(args.get("prompt"), args.get("negative_prompt"))
    if "height" in args and "width" in args:
        check_size(pipe, args["height"], args["width"])
    check_hint(pipe, args)
    check_callback_inputs(pipe, args)
    check_memory(pipe, args)


def count(key: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{key} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{key} must be at least 1, got {value}")
    return int(value)


def real(key: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{key} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value}")
    return float(value)


def check_steps(key: str, value, scheduler) -> None:
    """A step count: an int from 1 to the schedule's num_train_timesteps, as the reference's DDPM checks."""
    steps = count(key, value)
    limit = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or MAX_STEPS
    if steps > limit:
        raise ValueError(f"{key}={steps} is more than the {limit} timesteps the schedule has")


def check_prompts(prompt, negative_prompt) -> None:
    """prompt: a str or a non-empty list of str (None where other inputs stand in for it); negative_prompt:
    one str for all, or one per prompt."""
    for key, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
            raise TypeError(f"{key} must be a str or a non-empty list of str, got {value!r:.60}")
    if isinstance(negative_prompt, list) and prompt is not None:
        n = 1 if isinstance(prompt, str) else len(prompt)
        if len(negative_prompt) != n:
            raise ValueError(f"got {n} prompt{'s' * (n != 1)}, negative_prompt has {len(negative_prompt)}")


def finite(key: str, value) -> None:
    """Tensors (or lists and tuples of them) given as inputs must hold no NaN or inf."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for x in items:
        if isinstance(x, (torch.Tensor, np.ndarray)) and is_float(x) and not bool(torch.isfinite(
                torch.as_tensor(x)).all()):
            raise ValueError(f"{key} contains NaN or inf values")


def size_multiple(pipe) -> int:
    """The pixel multiple a decoder needs: the reference's Kandinsky rounding (MoVQ factor squared) and the
    UNet's depth (each level below the first halves the latents, and the up path must meet the skips)."""
    movq, unet = getattr(pipe, "movq", None), getattr(pipe, "unet", None)
    if movq is None or unet is None:
        return 1
    f = 2 ** (len(movq.config.block_out_channels) - 1)
    return math.lcm(f * f, f * 2 ** (len(unet.config.block_out_channels) - 1))


def check_size(pipe, height, width) -> None:
    for key, value in (("height", height), ("width", width)):
        count(key, value)
    m = size_multiple(pipe)
    if height % m or width % m:
        raise ValueError(f"height and width must be multiples of {m} px for this model, got {width}x{height} "
                         f"(width x height)")


def check_hint(pipe, args) -> None:
    """A hint needs a ControlNet UNet (addition_embed_type "image_hint"), and such a UNet needs a hint."""
    unet = getattr(pipe, "unet", None)
    kind = getattr(getattr(unet, "config", None), "addition_embed_type", None)
    if "hint" in args and kind != "image_hint":
        raise ValueError(f"hint: this UNet (addition_embed_type={kind!r}) takes no hint; load a ControlNet "
                         f"decoder (e.g. kandinsky-2-2-controlnet-depth)")
    if "hint" not in args and kind == "image_hint":
        raise ValueError(f"{type(pipe).__name__}: this UNet is a ControlNet (it needs a hint); use "
                         f"KandinskyV22ControlnetPipeline")


def check_callback_inputs(pipe, args) -> None:
    """Tensor names asked of step callbacks, the prior's too (combined pipelines)."""
    for prefix in ("", "prior_"):
        names = args.get(f"{prefix}callback_on_step_end_tensor_inputs")
        owner = pipe.prior_pipe if prefix and hasattr(type(pipe), "prior_pipe") else pipe
        bad = [k for k in names or () if k not in owner._callback_tensor_inputs]
        if bad:
            raise ValueError(f"{prefix}callback_on_step_end_tensor_inputs: {bad} not in "
                             f"{owner._callback_tensor_inputs}")


# --------------------------------------------------------------------------------------------- images

def rescaled(key: str, image):
    """16-bit PIL images and integer arrays/tensors by their type's range (8-bit PIL images, float tensors in
    [0, 1]: what every pipeline reads the same way); anything else as given."""
    if isinstance(image, list):
        return [rescaled(key, i) for i in image]
    if isinstance(image, PIL.Image.Image) and image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        x = np.asarray(image).astype(np.float64)
        if x.min() < 0 or x.max() > 65535:
            raise ValueError(f"{key}: a 32-bit integer image with values outside 0..65535")
        return PIL.Image.fromarray(np.round(x / 257).astype(np.uint8), mode="L")
    if not isinstance(image, (np.ndarray, torch.Tensor)) or is_float(image):
        return image
    top = {"uint8": 255, "uint16": 65535}.get(str(image.dtype).replace("torch.", ""))
    if top is None:
        raise TypeError(f"{key}: {image.dtype} values have no known range; pass uint8 (0..255), uint16 "
                        f"(0..65535) or floats")
    if key == "mask_image":  # masks of 0 and 1 are as usual as masks of 0 and 255
        x = torch.as_tensor(image).float()
        return x / top if x.max() > 1 else x
    if isinstance(image, torch.Tensor) or key == "hint":
        return torch.as_tensor(image).float() / top
    return rgb_images(np.round(image.astype(np.float64) * 255 / top).astype(np.uint8))


def is_float(x) -> bool:
    return x.is_floating_point() if isinstance(x, torch.Tensor) else x.dtype.kind == "f"


def rgb_images(x: np.ndarray):
    """uint8 HWC (or NHWC) arrays as PIL images, which every pipeline reads as 0..255."""
    if x.ndim == 4:
        return [PIL.Image.fromarray(i.squeeze(-1) if i.shape[-1] == 1 else i) for i in x]
    return PIL.Image.fromarray(x.squeeze(-1) if x.ndim == 3 and x.shape[-1] == 1 else x)


# --------------------------------------------------------------------------------------------- memory

def available_memory(device: torch.device) -> int:
    """Bytes free where the activations will live: the accelerator's free memory, else MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rows(args) -> int:
    """How many images (or embeddings) the call makes."""
    prompt = args.get("prompt")
    n = len(prompt) if isinstance(prompt, list) else 1
    for key in ("image_embeds", "image_embeddings", "prompt_embeds"):
        x = args.get(key)
        if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim >= 2:
            n = max(n, x.shape[0])
    num = args.get("num_images_per_prompt", 1)
    return n * (num if isinstance(num, int) else 1)


def channels(model, index: int = 0) -> int:
    c = model.config
    widths = getattr(c, "block_out_channels", None) or getattr(c, "c_hidden", None) or (getattr(c, "c", 0),)
    return widths[index]


def output_pixels(pipe, args) -> int:
    """How many pixels each output image has, where the arguments or the models say."""
    if isinstance(args.get("height"), int) and isinstance(args.get("width"), int):
        return args["height"] * args["width"]
    if getattr(pipe, "super_res_first", None) is not None:  # unCLIP: sizes fixed by the models
        side = pipe.super_res_first.config.sample_size
        return side * side if isinstance(side, int) else math.prod(side)
    x = args.get("image_embeddings")  # Würstchen's decoder: stage B latents, 4x by stage A
    if isinstance(x, torch.Tensor) and x.ndim == 4 and hasattr(pipe, "latent_dim_scale"):
        return int(x.shape[-2] * x.shape[-1] * (pipe.latent_dim_scale * 4) ** 2)
    return 0


def estimate(pipe, args) -> int:
    """A lower bound of the call's peak memory in bytes: the decoded images (with the widest full-resolution
    activation of an image decoder, its input and output), the Kandinsky UNet's first level and the prior's
    token activations, each doubled where guidance doubles the batch. Refusing on it refuses no call that
    could have run."""
    n, guide, pixels = rows(args), 2, output_pixels(pipe, args)
    names = ("movq", "vae", "super_res_last")
    decoder = next((getattr(pipe, k) for k in names if getattr(pipe, k, None) is not None), None)
    need = n * pixels * (3 + 2 * (channels(decoder) if decoder is not None else 0)) * 4
    unet, movq = getattr(pipe, "unet", None), getattr(pipe, "movq", None)
    if unet is not None and movq is not None:
        f = 2 ** (len(movq.config.block_out_channels) - 1)
        need += guide * n * pixels // f**2 * channels(unet) * 2 * 4
    prior = getattr(pipe, "prior", None) or getattr(pipe, "prior_prior", None)
    c = getattr(prior, "config", None)
    if c is not None and hasattr(c, "num_embeddings"):  # the residual stream, its MLP's 4x, attention scores
        tokens, heads = c.num_embeddings + c.additional_embeddings, c.num_attention_heads
        need += guide * n * tokens * (5 * heads * c.attention_head_dim + heads * tokens) * 4
    return need


def check_memory(pipe, args) -> None:
    need = estimate(pipe, args)
    if not need:
        return
    free = available_memory(pipe.device)
    if need > free:
        size = f"{args['width']}x{args['height']} px, " if "height" in args else ""
        raise MemoryError(f"{type(pipe).__name__}: {size}{rows(args)} image(s) need at least "
                          f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are available; ask for fewer or "
                          f"smaller images")


# --------------------------------------------------------------------------------------------- outputs

def finite_output(name: str, out):
    """Tensors and arrays a call returns must be finite: NaN inputs or weights otherwise give black images."""
    values = out.to_tuple() if hasattr(out, "to_tuple") else out if isinstance(out, tuple) else (out,)
    for value in values:
        if isinstance(value, (torch.Tensor, np.ndarray)) and is_float(value):
            finite_stage(f"{'prior' if 'Prior' in name else 'decoder'} ({name})", torch.as_tensor(value))
    return out


def finite_stage(stage: str, x: torch.Tensor) -> torch.Tensor:
    """One stage's output (prior embeddings, decoder latents), checked once per stage, not per step."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{stage}: the stage's output has NaN or inf values (from NaN or inf "
                                 f"inputs, weights or an unstable model)")
    return x
