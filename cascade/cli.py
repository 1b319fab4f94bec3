"""The `cascade` command: every task of the pipelines from a shell, on the job layer (cascade/jobs.py); each
PNG carries its own recipe."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__

# subcommand: (task of cascade/jobs.py, takes a prompt, its inputs, help)
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
COMMAND_OF = {task: command for command, (task, *_) in COMMANDS.items()}
# Recipe fields the options set (the rest of Recipe's fields come from the positional arguments).
FIELDS = ("negative", "seed", "steps", "prior_steps", "super_res_steps", "guidance", "prior_guidance",
          "strength", "size", "scheduler", "deepcache", "dtype", "device", "image", "mask", "rect", "hint",
          "item", "n")
OPTION_NAMES = {"n": "--num-images", "out": "--out", "output": "--output", "jobs": "JOBS", "model": "MODEL"}
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# --------------------------------------------------------------------------------------------- option types

def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def seed(text: str) -> int:
    from .recipe import MAX_SEED

    if not text.isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED}, got {text!r}")
    return int(text)


def size(text: str) -> tuple[int, int]:
    """WxH (or N for NxN) -> (width, height)."""
    from .recipe import RecipeError, parse_size

    try:
        return parse_size(text)
    except RecipeError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768, got {text!r}") from None


def sampler(text: str) -> str:
    from .schedulers import SAMPLERS

    if text not in SAMPLERS:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r}; expected one of {', '.join(SAMPLERS)}")
    return text


def option_name(field: str) -> str:
    return OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


# --------------------------------------------------------------------------------------------- generating

def recipe_of(args):
    """The recipe the options of a generating subcommand say; paths as typed (relative to here)."""
    from .jobs import Recipe

    values = {k: getattr(args, k, None) for k in FIELDS}
    values["item"] = tuple(values["item"]) if values["item"] else None
    return Recipe(model=args.model, task=COMMANDS[args.command][0], prompt=getattr(args, "prompt", None),
                  **{k: v for k, v in values.items() if v is not None})


class Progress:
    """One bar per stage on stderr (`prior 2/2`, `decoder 10/10`), driven by the job's on_step."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.stage = quiet, None, None

    def __call__(self, stage: str, step: int, total: int):
        from tqdm.auto import tqdm

        if self.bar is None or stage != self.stage or step <= self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, disable=self.quiet, leave=True,
                            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}")
            self.stage = stage
        self.bar.total = total
        self.bar.update(step - self.bar.n)

    def close(self):
        self.bar = self.bar.close() if self.bar is not None else None


def say_to(quiet: bool):
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))


def loading_note(say):
    def note(folder, cls):
        say(f"loading {folder} as {cls.__name__}")
    return note


def generate(args) -> int:
    """Every generating subcommand: the recipe, its job prepared once, then one image per seed."""
    from .jobs import Models, check_folder, prepare, rebase, write_new

    out = check_folder(Path(args.out))
    recipe = rebase(recipe_of(args), Path("."), out)  # the PNG records paths relative to its folder
    say, progress, written = say_to(args.quiet), Progress(args.quiet), []
    job = prepare(recipe, Models(on_load=loading_note(say)), root=out)
    for s in job.seeds():
        result = job.make(s, on_step=progress)
        progress.close()
        path = write_new(out, f"{args.command}-{s}", result.png(), overwrite=args.overwrite)
        w, h = result.image.size
        say(f"wrote {path} ({w}x{h}, seed {s}, {result.seconds:.1f} s)")
        written.append({"path": str(path), "width": w, "height": h, **result.recipe.to_dict(),
                        "task": args.command})
    print(json.dumps(written, indent=2) if args.json else "\n".join(w["path"] for w in written))
    return 0


def command_line(recipe) -> list[str]:
    """The command line that makes `recipe`."""
    command = COMMAND_OF[recipe.task]
    line = [command, recipe.model] + ([recipe.prompt] if COMMANDS[command][1] else [])
    for key, value in recipe.to_dict().items():
        if key in FIELDS:
            line += [a for v in (value if key == "item" else [value]) for a in (option_name(key), str(v))]
    return line


def replay(argv: list[str]) -> list[str]:
    """`generate --from IMAGE.png [overrides]` -> the command line that made IMAGE.png, then the overrides;
    the recipe's paths, relative to the PNG's folder, made relative to here."""
    from .jobs import Recipe, read_png, rebase

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from", dest="source", required=True)
    known, rest = pre.parse_known_args(argv)
    made = read_png(known.source).get("cascade")
    recipe = Recipe.from_png(known.source)
    if made != __version__:
        print(f"note: made by cascade {made}, this is {__version__}", file=sys.stderr)
    return command_line(rebase(recipe, Path(known.source).parent, Path("."))) + rest


def demo(args) -> int:
    """The built-in demo cascade, with the file rules and the recipe of every command."""
    from .demo_world import parse
    from .jobs import Models, Recipe, RecipeError, check_folder, prepare, write_new

    try:
        parse(args.prompt)
    except ValueError:
        print("note: the demo model knows one world, captions like 'a red circle on a blue background' "
              "(colours: red green blue yellow cyan magenta white black; circle, square or triangle)",
              file=sys.stderr)
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise RecipeError("output", f"expected a .png file name, got {args.output!r}")
    folder = check_folder(output.parent, "output")
    recipe = Recipe(model="demo", prompt=args.prompt, seed=args.seed, steps=args.steps,
                    prior_steps=args.prior_steps, scheduler=args.scheduler, deepcache=args.deepcache)
    progress = Progress(args.quiet)
    result = prepare(recipe, Models(), root=folder).make(args.seed, on_step=progress)
    progress.close()
    path = write_new(folder, output.stem, result.png(), overwrite=args.overwrite)
    print(f"wrote {path} ({result.image.width}x{result.image.height}) in {result.seconds:.1f} s")
    return 0


# --------------------------------------------------------------------------------------------- info

def tensors(path: Path) -> list[tuple[str, list]]:
    """(dtype, shape) of each tensor from a safetensors JSON header (.bin files are not read); the header's
    claimed length is checked against the file's before anything is read."""
    if path.suffix != ".safetensors":
        return []
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > min(path.stat().st_size - 8, 100 * 2**20):
            raise ValueError(f"{path}: the header claims {length} bytes, more than the file holds")
        header = json.loads(f.read(length))
    return [(DTYPES.get(v["dtype"], v["dtype"]), v["shape"]) for k, v in header.items() if k[:2] != "__"]


def listing(model: str):
    """(folder with the config files, {file: bytes}, file -> tensors) for a folder or a Hub repo; from the
    Hub only config files download, and the weights' headers are read remotely."""
    from .jobs import locate

    folder = locate(model, patterns=["*.json", "*.txt", "README.md"])
    if Path(model).expanduser().is_dir() or folder.is_relative_to(Path(__file__).parent) \
            or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return folder, on_disk(folder), lambda name: tensors(folder / name)
    from huggingface_hub import HfApi, parse_safetensors_file_metadata as remote

    files = {s.rfilename: s.size or 0 for s in HfApi().model_info(model, files_metadata=True).siblings}
    return folder, files, lambda name: [(DTYPES.get(t.dtype, t.dtype), t.shape) for t in remote(
        model, name).tensors.values()] if name.endswith(".safetensors") else []


def on_disk(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def component(name: str, entry: list, files: dict, header) -> dict:
    """A component's class and, from its weight files (safetensors first, without a variant if there is one),
    its parameter count, dtypes and bytes."""
    from math import prod

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


def parts_of(folder: Path, index: dict) -> list[tuple[str, Path, dict]]:
    """(name prefix, folder, its index) of a pipeline and of what runs with it: the prior a decoder's model
    card names when it is a local folder, and the built-in demo's inpainting decoder."""
    from .config import read_json
    from .loading import BUILTIN, builtin
    from .pipelines.core import model_card_prior

    found = [("", folder, index)]
    prior = model_card_prior(folder)
    if prior and "prior_prior" not in index and (folder.parent / prior / "model_index.json").is_file():
        found.append(("prior_", folder.parent / prior, read_json(folder.parent / prior / "model_index.json")))
    if builtin(folder) is not None and folder.name == "demo":
        inpaint = BUILTIN / "demo-inpaint"
        found.append(("inpaint_", inpaint, read_json(inpaint / "model_index.json")))
    return found


def samplers(saved: str | None) -> list[str]:
    from .pipelines.auto import TASKS, pipeline_class
    from .schedulers import samplers_for

    family = next((f for f in TASKS if saved and saved.startswith(f)), None)
    return samplers_for(pipeline_class(saved, next(iter(TASKS[family])))) if family else []


def info(args) -> int:
    """What MODEL holds, from model_index.json (or a model's config.json) and its weight files' headers."""
    from .config import read_json

    folder, files, header = listing(args.model)
    pipeline = (folder / "model_index.json").is_file()
    index = read_json(folder / ("model_index.json" if pipeline else "config.json"))
    if not isinstance(index, dict):
        raise ValueError(f"{folder}: its index is not a JSON object")
    rows = [] if pipeline else [component(".", ["", index.get("_class_name") or ",".join(
        index.get("architectures", ["?"]))], files, header)]
    total = sum(files.values())
    for prefix, where, found in parts_of(folder, index) if pipeline else []:
        local, read = (files, header) if not prefix else (on_disk(where), lambda n, w=where: tensors(w / n))
        total += sum(local.values()) if prefix else 0
        rows += [{**component(k, v, local, read), "name": prefix + k} for k, v in found.items()
                 if isinstance(v, list) and len(v) == 2 and v[1] and k[0] != "_"]
    found = {"model": args.model, "pipeline": index.get("_class_name"), "components": rows,
             "samplers": samplers(index.get("_class_name")) if pipeline else [],
             "parameters": sum(r["parameters"] or 0 for r in rows), "bytes": total}
    lines = [f"{args.model}: {found['pipeline']}, {human(found['parameters'])} parameters, "
             f"{human(found['bytes'], 'B')} on disk"]
    lines += [f"  {r['name']:<22} {r['class']:<30} {human(r['parameters']):>7}  {r['dtype'] or '-':<8} "
              f"{human(r['bytes'], 'B'):>8}" for r in rows]
    lines += [f"  samplers: {', '.join(found['samplers'])}"] if found["samplers"] else []
    print(json.dumps(found, indent=2) if args.json else "\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------- the parser

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
}
GENERATION = {
    "negative": (["--negative"], dict(metavar="TEXT", help="negative prompt")),
    "steps": (["--steps"], dict(type=positive_int, metavar="N", help="steps of the decoder (or only) stage")),
    "prior_steps": (["--prior-steps"], dict(type=positive_int, metavar="N", help="steps of the prior")),
    "super_res_steps": (["--super-res-steps"], dict(type=positive_int, metavar="N",
                                                    help="steps of the super-resolution stage (Karlo)")),
    "guidance": (["--guidance"], dict(type=float, metavar="S", help="guidance scale of the decoder stage")),
    "prior_guidance": (["--prior-guidance"], dict(type=float, metavar="S", help="guidance scale, prior")),
    "size": (["--size"], dict(type=size, metavar="WxH", help="default: the model's (with an input image, at "
                              "its aspect ratio)")),
    "n": (["-n", "--num-images"], dict(type=positive_int, default=1, metavar="N", dest="n",
                                       help="how many images; image i uses seed SEED + i")),
    "seed": (["--seed"], dict(type=seed, help="random seed (default: a random one, recorded in the PNG)")),
    "scheduler": (["--scheduler"], dict(type=sampler, metavar="NAME", help="sampler of the decoder stage: "
                                        "ddpm, ddim, dpm++2m, dpm++2m-karras, dpm++sde, unipc, euler, "
                                        "euler-a, heun (what a model takes: cascade info MODEL; the demo's "
                                        "default: dpm++sde at 20 steps, DeepCache 3)")),
    "deepcache": (["--deepcache"], dict(type=positive_int, metavar="N", help="DeepCache: run the whole "
                                        "decoder UNet every N steps, only its shallow blocks in between (1: "
                                        "every step whole)")),
    "dtype": (["--dtype"], dict(choices=("float32", "float16", "bfloat16", "fp32", "fp16", "bf16"),
                                help="weights' dtype (bf16: the fast CPU path)")),
    "device": (["--device"], dict(help="cpu (default), cuda, cuda:1, mps, ...")),
    "out": (["--out"], dict(default=".", metavar="DIR", help="folder to write to (default: .)")),
    "overwrite": (["--overwrite"], dict(action="store_true", help="replace files, no new names")),
    "quiet": (["-q", "--quiet"], dict(action="store_true", help="no progress on stderr")),
    "json": (["--json"], dict(action="store_true", help="print what was written as JSON")),
}


def add(p, table: dict, names):
    for name in names:
        flags, settings = table[name]
        p.add_argument(*flags, **settings)


def generating(sub):
    for name, (_, prompted, inputs, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("model", metavar="MODEL", help="pipeline folder, Hub repo id, or demo")
        if prompted:
            p.add_argument("prompt", help="what to draw")
        add(p, ARGUMENTS, [i for i in inputs if i != "mask"])
        add(p, GENERATION, GENERATION)
        if "mask" in inputs:
            where = p.add_mutually_exclusive_group(required=True)
            where.add_argument("--mask", metavar="IMG", help="white = repaint; the size of --image")
            where.add_argument("--rect", metavar="X,Y,W,H", help="repaint this rectangle of --image")
        if name == "generate":
            p.add_argument("--from", dest="source", metavar="IMAGE.png", help="remake IMAGE.png from its "
                           "recorded parameters (MODEL, prompt, options); options given here override them")
        p.set_defaults(run=generate)


def others(sub):
    from .batch import add_parser

    p = sub.add_parser("info", help="what a model folder or repo holds, read without loading weights")
    p.add_argument("model", metavar="MODEL", help="pipeline or model folder, Hub repo id, or demo")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(run=info)
    p = sub.add_parser("demo", help="draw a prompt with the built-in demo model (offline, seconds)")
    p.add_argument("prompt", nargs="?", default="a yellow triangle on a blue background")
    p.add_argument("--output", default="demo.png", metavar="FILE.png",
                   help="where to write (a new name if it exists: demo-1.png, ...)")
    p.add_argument("--seed", type=seed, default=0)
    add(p, GENERATION, ("steps", "prior_steps", "scheduler", "deepcache", "overwrite", "quiet"))
    p.set_defaults(run=demo)
    add_parser(sub, lambda p, names: add(p, {**ARGUMENTS, **GENERATION}, names))
    from .server import add_parser as add_serve_parser

    add_serve_parser(sub)


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="cascade", description="Cascaded text-to-image diffusion: Kandinsky 2.2, Würstchen, "
                 "Karlo (unCLIP) and the SD x2 latent upscaler. MODEL is a local folder, a Hub repo id or "
                 "demo (the built-in demo model).",
                 epilog="Each PNG records its parameters: `cascade generate --from IMAGE.png` remakes it.")
    top.add_argument("--version", action="version", version=f"cascade {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    generating(sub)
    others(sub)
    return top


def message(error: BaseException) -> str:
    """One line for an error: a recipe field named as its option."""
    from .recipe import RecipeError

    import pickle
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # colours some libraries put in their messages
    lines = [line for line in text.splitlines() if line.strip()] or [type(error).__name__]
    if isinstance(error, pickle.UnpicklingError):
        return f"a .bin weights file holds Python objects beyond tensors, refused unrun (weights_only): {lines[0]}"
    if isinstance(error, RecipeError):
        return option_name(error.field) + lines[0][len(error.field):]
    if isinstance(error, (MemoryError, RecursionError)):
        return f"{type(error).__name__}: {lines[0]}" if str(error) else type(error).__name__
    return lines[0]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["generate"] and any(a == "--from" or a.startswith("--from=") for a in argv):
            argv = replay(argv[1:])
        args = parser().parse_args(argv)
        return args.run(args)
    except KeyboardInterrupt:
        print("cascade: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # anything a user can cause: one line, never a traceback
        if os.environ.get("CASCADE_TRACEBACK"):
            raise
        print(f"cascade: error: {message(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
