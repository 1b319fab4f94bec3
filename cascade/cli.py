"""The `cascade` command: every task of the pipelines from a shell; each PNG carries its own recipe."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from math import prod
from pathlib import Path

from tqdm.auto import tqdm

from . import __version__

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "unclip": "UnCLIPScheduler",
              "wuerstchen": "DDPMWuerstchenScheduler", "euler": "EulerDiscreteScheduler"}
# What each family's decoder stage can run with: the loop scales no inputs (Euler needs the upscaler's Karras
# wrapper) and unCLIP's passes the next timestep.
FAMILY_SCHEDULERS = {"KandinskyV22": ("ddpm", "ddim"), "Wuerstchen": ("wuerstchen",), "UnCLIP": ("unclip",),
                     "StableDiffusionLatentUpscale": ("euler",)}
# subcommand: (task in pipelines/auto.py TASKS, takes a prompt, its inputs, help)
COMMANDS = {
    "generate": ("text2img", True, (), "text to image (Kandinsky 2.2, Würstchen, Karlo)"),
    "img2img": ("img2img", True, ("image", "strength"), "image to image guided by a prompt (Kandinsky 2.2)"),
    "inpaint": ("inpaint", True, ("image", "mask"), "repaint the masked part of an image (Kandinsky 2.2)"),
    "controlnet": ("controlnet", True, ("hint", "image?", "strength"),
                   "text or image to image steered by a hint, e.g. a depth map (Kandinsky 2.2 ControlNet)"),
    "variations": ("variation", False, ("image",), "variations of an image (Karlo image variations)"),
    "interpolate": ("interpolate", False, ("item",), "mix weighted prompts and images (Kandinsky 2.2)"),
    "upscale": ("upscale", True, ("image",), "upscale an image 2x in latent space (SD x2 latent upscaler)"),
}
# Option -> the pipeline parameters it sets: whichever the model's pipeline takes.
OPTIONS = {
    "negative": ("negative_prompt",), "steps": ("num_inference_steps", "decoder_num_inference_steps"),
    "prior_steps": ("prior_num_inference_steps",), "super_res_steps": ("super_res_num_inference_steps",),
    "guidance": ("guidance_scale", "decoder_guidance_scale"), "prior_guidance": ("prior_guidance_scale",),
    "strength": ("strength",), "size": ("height", "width"),
}
# What a PNG records besides task and version: enough to make it again (`generate --from`).
RECIPE = ("model", "prompt", "negative", "seed", "steps", "prior_steps", "super_res_steps", "guidance",
          "prior_guidance", "strength", "size", "scheduler", "dtype", "device", "image", "mask", "rect",
          "hint", "item")
INPUTS = ("image", "mask", "rect", "hint", "item", "strength", "prompt")
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# --------------------------------------------------------------------------------------------- inputs

def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def size(text: str) -> tuple[int, int]:
    """WxH (or N for NxN) -> (height, width)."""
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and (h or w).isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768, got {text!r}")
    return int(h or w), int(w)


def open_image(path: str, mode: str = "RGB"):
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except OSError:
        raise ValueError(f"{path}: {'not an image' if Path(path).is_file() else 'no such file'}") from None


def rect_mask(image, rect: str):
    import numpy as np
    import PIL.Image

    x, y, w, h = (int(v) for v in rect.split(","))
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > image.width or y + h > image.height:
        raise ValueError(f"--rect {rect}: not a rectangle inside the {image.width}x{image.height} image")
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[y: y + h, x: x + w] = 255
    return PIL.Image.fromarray(mask)


def read_item(item: str) -> tuple:
    """TEXT=WEIGHT or IMAGE=WEIGHT -> (prompt or image, weight, the item as recorded, paths absolute)."""
    text, sep, weight = item.rpartition("=")
    if not sep or not text:
        raise ValueError(f"--item {item!r}: expected TEXT=WEIGHT or IMAGE=WEIGHT")
    if Path(text).suffix.lower() not in IMAGE_SUFFIXES:
        return text, float(weight), item
    return open_image(text), float(weight), f"{Path(text).resolve()}={weight}"


def read_inputs(args) -> dict:
    """The prompt and images a task reads, as the pipeline parameters they fill (a hint at its own size,
    (1, 3, H, W) in [0, 1]); input paths are recorded absolute."""
    import numpy as np
    import torch

    inputs = {"prompt": args.prompt} if args.prompt is not None else {}
    for name, key in (("hint", "hint"), ("image", "image"), ("mask", "mask_image")):
        if getattr(args, name):
            inputs[key] = open_image(getattr(args, name), "L" if name == "mask" else "RGB")
            args.input_size = (inputs[key].height, inputs[key].width)
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    if args.mask and inputs["mask_image"].size != inputs["image"].size:
        raise ValueError("--mask is {}x{}, --image {}x{}: they must be the same size".format(
            *inputs["mask_image"].size, *inputs["image"].size))
    if args.rect:
        inputs["mask_image"] = rect_mask(inputs["image"], args.rect)
    if args.hint:
        inputs["hint"] = torch.from_numpy(np.asarray(inputs["hint"], np.float32) / 255).permute(2, 0, 1)[None]
    if args.item:
        items = zip(*map(read_item, args.item))
        inputs["images_and_prompts"], inputs["weights"], args.item = map(list, items)
    return inputs


# --------------------------------------------------------------------------------------------- pipelines

def locate(model: str, patterns=None) -> Path:
    """MODEL as a folder, or a Hub repo id downloaded (what a load reads, or only `patterns`)."""
    from .loading import builtin
    from .pipelines.core import download, resolve

    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if (own := builtin(model)) is not None:
        return own
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"{model}: no such folder (and not a Hub repo id, owner/name)")
    return download(model) if patterns is None else resolve(model, None, patterns)


def native_size(folder: Path) -> tuple[int, int] | None:
    """The size a Kandinsky decoder was trained at: its UNet's sample size times the MoVQ's downscaling."""
    from .config import read_json

    unet, movq = folder / "unet" / "config.json", folder / "movq" / "config.json"
    if not (unet.is_file() and movq.is_file()):
        return None
    sample = read_json(unet).get("sample_size")
    if not isinstance(sample, int):
        return None
    side = sample * 2 ** (len(read_json(movq)["block_out_channels"]) - 1)
    return side, side


def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def call_kwargs(args, cls, base) -> dict:
    """The parameters the options set, pipeline defaults filled in so the recipe is explicit. An option the
    model's pipelines do not take is an error, not silently dropped; the size defaults to the input's."""
    known = {**defaults(base.__call__), **defaults(cls.__call__)}
    kw = {}
    for option, names in OPTIONS.items():
        taken, value = [n for n in names if n in known], getattr(args, option)
        if value is not None and not taken:
            raise ValueError(f"--{option.replace('_', '-')}: {base.__name__} has no such setting")
        value = getattr(args, "input_size", None) if option == "size" and value is None and taken else value
        values = value if option == "size" and value else [value] * len(taken)
        kw.update({n: known[n] if v is None else v for n, v in zip(taken, values)})
    return kw


def load(args, folder: Path, cls):
    """The pipeline in --dtype on --device with --scheduler; records what it got."""
    import torch
    from transformers.utils import logging

    import cascade

    logging.disable_progress_bar()  # per-file loading bars; stages report through Progress
    dtype, device = getattr(torch, args.dtype) if args.dtype else None, torch.device(args.device or "cpu")
    if device.type != "cpu" and not getattr(getattr(torch, device.type, None), "is_available", bool)():
        raise ValueError(f"--device {args.device}: not available here")
    pipe = cls.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    slot = "scheduler" if hasattr(pipe, "scheduler") else "decoder_scheduler"
    old, new = getattr(pipe, slot), SCHEDULERS.get(args.scheduler)
    if new and type(old).__name__ != new:
        setattr(pipe, slot, getattr(cascade, new).from_config(old.config))
    args.scheduler = {v: k for k, v in SCHEDULERS.items()}.get(type(getattr(pipe, slot)).__name__)
    args.dtype, args.device = str(pipe.dtype).removeprefix("torch."), str(pipe.device)
    return pipe


class Progress:
    """A step counter per stage on stderr, driven by the pipelines' step-end callbacks."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.stage = quiet, None, None

    def hook(self, stage: str):
        def on_step(pipe, i, t, tensors):
            name = getattr(pipe, "stage", None) or stage  # unCLIP names its own stages
            if i == 0 or name != self.stage:
                self.close()
                self.bar, self.stage = tqdm(desc=name, unit="step", file=sys.stderr, disable=self.quiet), name
            self.bar.update(1)

        return on_step

    def close(self):
        self.bar = self.bar.close() if self.bar is not None else None


def images_for(pipe, cls, kw: dict) -> list:
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


# --------------------------------------------------------------------------------------------- outputs

def save(image, recipe: dict, args) -> Path:
    """A PNG whose text chunks hold the recipe; a new name rather than overwriting, unless --overwrite."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in {"task": args.command, "cascade": __version__, **recipe}.items():
        if value is not None:
            info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path, k = Path(args.out, f"{args.command}-{recipe['seed']}.png"), 0
    while path.exists() and not args.overwrite:
        k += 1
        path = Path(args.out, f"{args.command}-{recipe['seed']}-{k}.png")
    image.save(path, pnginfo=info)
    return path


def replay(argv: list[str]) -> list[str]:
    """`generate --from IMAGE.png [overrides]` -> the command line that made IMAGE.png, then the overrides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from", dest="source", required=True)
    known, rest = pre.parse_known_args(argv)
    text = open_image(known.source).info
    if text.get("task") not in COMMANDS or "model" not in text:
        raise ValueError(f"{known.source}: holds no cascade recipe")
    if text["cascade"] != __version__:
        print(f"note: made by cascade {text['cascade']}, this is {__version__}", file=sys.stderr)
    line = [text["task"], text["model"]] + ([text["prompt"]] if COMMANDS[text["task"]][1] else [])
    for key in RECIPE[2:]:
        values = json.loads(text[key]) if key == "item" and key in text else [text.get(key)]
        line += [a for v in values if v is not None for a in (f"--{key.replace('_', '-')}", v)]
    return line + rest


def run(args) -> int:
    """Every generating subcommand: read inputs, load, then one pipeline run per image and seed."""
    import torch

    from .config import read_json
    from .pipelines.auto import pipeline_class

    task = COMMANDS[args.command][0] + ("_img2img" if args.command == "controlnet" and args.image else "")
    inputs = read_inputs(args)
    folder = locate(args.model)
    args.input_size = getattr(args, "input_size", None) or native_size(folder)
    saved = read_json(folder / "model_index.json")["_class_name"]
    cls = pipeline_class(saved, task)
    allowed = next(v for k, v in FAMILY_SCHEDULERS.items() if saved.startswith(k))
    if args.scheduler not in (None, *allowed):
        raise ValueError(f"--scheduler {args.scheduler}: {saved} runs with {' or '.join(allowed)}")
    # A decoder takes embeddings: load the family's text-to-image pipeline for its prior.
    decoder = "image_embeds" in inspect.signature(cls.__call__).parameters
    base = pipeline_class(saved, "text2img") if decoder else cls
    kw = {**call_kwargs(args, cls, base), **inputs}
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    say(f"loading {args.model} as {base.__name__}" + (f" + {cls.__name__}" if cls is not base else ""))
    pipe = load(args, folder, base)
    for option, names in OPTIONS.items():  # the recipe holds the values used, defaults included
        values = [kw[n] for n in names if n in kw]
        values = ["{1}x{0}".format(*values)] if option == "size" and values else values
        setattr(args, option, values[0] if values else None)
    if Path(args.model).expanduser().is_dir():  # folders are recorded absolute, repo ids as they are
        args.model = str(folder.resolve())
    args.seed = int.from_bytes(os.urandom(4), "little") if args.seed is None else args.seed
    progress, written = Progress(args.quiet), []
    for seed in range(args.seed, args.seed + args.num_images):
        start = time.perf_counter()
        kw.update(generator=torch.Generator().manual_seed(seed))
        kw.update(prior_callback_on_step_end=progress.hook("prior"),
                  callback_on_step_end=progress.hook("upscale" if task == "upscale" else "decoder"))
        image = images_for(pipe, cls, kw)[0]
        progress.close()
        recipe = {k: getattr(args, k) for k in RECIPE} | {"seed": seed}
        path = save(image, recipe, args)
        say(f"wrote {path} ({image.width}x{image.height}, seed {seed}, {time.perf_counter() - start:.1f} s)")
        written.append({"path": str(path), "width": image.width, "height": image.height, "task": args.command,
                        **{k: v for k, v in recipe.items() if v is not None}})
    print(json.dumps(written, indent=2) if args.json else "\n".join(w["path"] for w in written))
    return 0


# --------------------------------------------------------------------------------------------- info

def tensors(path: Path) -> list[tuple[str, list]]:
    """(dtype, shape) of each tensor from a safetensors JSON header (.bin files are not read)."""
    if path.suffix != ".safetensors":
        return []
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return [(DTYPES.get(v["dtype"], v["dtype"]), v["shape"]) for k, v in header.items() if k[:2] != "__"]


def listing(model: str):
    """(folder with the config files, {file: bytes}, file -> tensors) for a folder or a Hub repo; from the
    Hub only config files download, and the weights' headers are read remotely."""
    folder = locate(model, ["*.json", "*.txt", "README.md"])
    if Path(model).expanduser().is_dir() or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        return folder, files, lambda name: tensors(folder / name)
    from huggingface_hub import HfApi, parse_safetensors_file_metadata as remote

    files = {s.rfilename: s.size or 0 for s in HfApi().model_info(model, files_metadata=True).siblings}
    return folder, files, lambda name: [(DTYPES.get(t.dtype, t.dtype), t.shape) for t in remote(
        model, name).tensors.values()] if name.endswith(".safetensors") else []


def component(name: str, entry: list, files: dict, header) -> dict:
    """A component's class and, from its weight files (safetensors first, without a variant if there is one),
    its parameter count, dtypes and bytes."""
    prefix = "" if name == "." else f"{name}/"
    mine, weights = [f for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]], []
    for ext in (".safetensors", ".bin"):
        found = [f for f in mine if f.endswith(ext)]
        weights = weights or [f for f in found if Path(f).name.count(".") == 1] or found
    shapes = [t for f in weights for t in header(f)]
    return {"name": name, "library": entry[0], "class": entry[1], "files": weights,
            "parameters": sum(prod(s) for _, s in shapes) if weights else None,
            "dtype": ",".join(sorted({d for d, _ in shapes})) or None,
            "bytes": sum(files[f] for f in weights) if weights else None}


def human(n, unit="") -> str:
    scale = next(((s, p) for s, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if n and n >= s), (1, ""))
    return "-" if n is None else f"{n / scale[0]:.3g} {scale[1]}{unit}".strip()


def info(args) -> int:
    """What MODEL holds, from model_index.json (or a model's config.json) and its weight files' headers."""
    from .config import read_json

    folder, files, header = listing(args.model)
    pipeline = (folder / "model_index.json").is_file()
    index = read_json(folder / ("model_index.json" if pipeline else "config.json"))
    parts = {k: v for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] and k[0] != "_"} \
        if pipeline else {".": ["", index.get("_class_name") or ",".join(index.get("architectures", ["?"]))]}
    rows = [component(k, v, files, header) for k, v in parts.items()]
    found = {"model": args.model, "pipeline": index.get("_class_name"), "components": rows,
             "parameters": sum(r["parameters"] or 0 for r in rows), "bytes": sum(files.values())}
    lines = [f"{args.model}: {found['pipeline']}, {human(found['parameters'])} parameters, "
             f"{human(found['bytes'], 'B')} on disk"]
    lines += [f"  {r['name']:<22} {r['class']:<30} {human(r['parameters']):>7}  {r['dtype'] or '-':<8} "
              f"{human(r['bytes'], 'B'):>8}" for r in rows]
    print(json.dumps(found, indent=2) if args.json else "\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------- the parser

def demo(args) -> int:
    """The built-in demo cascade with every default but the size it was trained at."""
    import torch

    from .demo_world import SIZE, parse
    from .pipelines.kandinsky import KandinskyV22CombinedPipeline

    try:
        parse(args.prompt)
    except ValueError:
        print("note: the demo model knows one world, captions like 'a red circle on a blue background' "
              "(colours: red green blue yellow cyan magenta white black; circle, square or triangle)",
              file=sys.stderr)
    start = time.perf_counter()
    pipe = KandinskyV22CombinedPipeline.from_pretrained("demo")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    image = pipe(args.prompt, height=SIZE, width=SIZE, generator=generator).images[0]
    image.save(args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}) in {time.perf_counter() - start:.1f} s")
    return 0


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


ARGUMENTS = {  # subcommand inputs, then the options of every generating subcommand
    "image": (["--image"], dict(required=True, metavar="IMG", help="input image")),
    "image?": (["--image"], dict(metavar="IMG", help="start from this image (image to image)")),
    "strength": (["--strength"], dict(type=float, metavar="S", help="share of the schedule re-run, 0..1")),
    "hint": (["--hint"], dict(required=True, metavar="IMG",
                              help="control image such as a depth map, at the output size")),
    "item": (["--item"], dict(action="append", required=True, metavar="TEXT=W|IMG=W",
                              help="a prompt or an image file, and its weight; repeat")),
    "negative": (["--negative"], dict(metavar="TEXT", help="negative prompt")),
    "steps": (["--steps"], dict(type=positive_int, metavar="N", help="steps of the decoder (or only) stage")),
    "prior_steps": (["--prior-steps"], dict(type=positive_int, metavar="N", help="steps of the prior")),
    "super_res_steps": (["--super-res-steps"], dict(type=positive_int, metavar="N",
                                                    help="steps of the super-resolution stage (Karlo)")),
    "guidance": (["--guidance"], dict(type=float, metavar="S", help="guidance scale of the decoder stage")),
    "prior_guidance": (["--prior-guidance"], dict(type=float, metavar="S", help="guidance scale, prior")),
    "size": (["--size"], dict(type=size, metavar="WxH", help="default: the input's, else the model's")),
    "n": (["-n", "--num-images"], dict(type=positive_int, default=1, metavar="N",
                                       help="how many images; image i uses seed SEED + i")),
    "seed": (["--seed"], dict(type=int, help="random seed (default: a random one, recorded in the PNG)")),
    "scheduler": (["--scheduler"], dict(choices=SCHEDULERS, help="decoder stage (Kandinsky: ddpm, ddim)")),
    "dtype": (["--dtype"], dict(choices=("float32", "float16", "bfloat16"), help="weights' dtype")),
    "device": (["--device"], dict(help="cpu (default), cuda, cuda:1, mps, ...")),
    "out": (["--out"], dict(default=".", metavar="DIR", help="folder to write to (default: .)")),
    "overwrite": (["--overwrite"], dict(action="store_true", help="replace files, no new names")),
    "quiet": (["-q", "--quiet"], dict(action="store_true", help="no progress on stderr")),
    "json": (["--json"], dict(action="store_true", help="print what was written as JSON")),
}
GENERATION = list(ARGUMENTS)[5:]


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="cascade", description="Cascaded text-to-image diffusion: Kandinsky 2.2, Würstchen, "
                 "Karlo (unCLIP) and the SD x2 latent upscaler. MODEL is a local folder, a Hub repo id or "
                 "demo (the built-in demo model).",
                 epilog="Each PNG records its parameters: `cascade generate --from IMAGE.png` remakes it.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, prompted, inputs, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("model", metavar="MODEL", help="pipeline folder, Hub repo id, or demo")
        if prompted:
            p.add_argument("prompt", help="what to draw")
        for flags, settings in (ARGUMENTS[i] for i in [*inputs, *GENERATION] if i != "mask"):
            p.add_argument(*flags, **settings)
        if "mask" in inputs:
            where = p.add_mutually_exclusive_group(required=True)
            where.add_argument("--mask", metavar="IMG", help="white = repaint; the size of --image")
            where.add_argument("--rect", metavar="X,Y,W,H", help="repaint this rectangle of --image")
        if name == "generate":
            p.add_argument("--from", dest="source", metavar="IMAGE.png", help="remake IMAGE.png from its "
                           "recorded parameters (MODEL, prompt, options); options given here override them")
        absent = [i for i in INPUTS if i not in inputs and (i != "prompt" or not prompted)]
        p.set_defaults(run=run, **dict.fromkeys(absent))
    p = sub.add_parser("info", help="what a model folder or repo holds, read without loading weights")
    p.add_argument("model", metavar="MODEL", help="pipeline or model folder, or Hub repo id")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(run=info)
    p = sub.add_parser("demo", help="draw a prompt with the built-in demo model (offline, seconds)")
    p.add_argument("prompt", nargs="?", default="a yellow triangle on a blue background")
    p.add_argument("--output", default="demo.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    return top


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["generate"] and any(a == "--from" or a.startswith("--from=") for a in argv):
            argv = replay(argv[1:])
        args = parser().parse_args(argv)
        return args.run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        if os.environ.get("CASCADE_TRACEBACK"):
            raise
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        print(f"cascade: error: {lines[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
