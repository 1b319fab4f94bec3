"""The `cascade` command."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def demo(args) -> int:
    import torch

    from .demo import random_kandinsky
    from .pipelines.kandinsky import KandinskyV22CombinedPipeline

    folder = Path(args.checkpoint)
    if not (folder / "model_index.json").is_file():
        print(f"building a small Kandinsky 2.2 checkpoint with RANDOM weights in {folder} "
              "(its images are noise, not the prompt)", file=sys.stderr)
        random_kandinsky(folder)
    start = time.perf_counter()
    pipe = KandinskyV22CombinedPipeline.from_pretrained(folder)
    image = pipe(args.prompt, num_inference_steps=args.steps, prior_num_inference_steps=args.steps,
                 height=args.size, width=args.size, generator=torch.Generator().manual_seed(args.seed)).images[0]
    image.save(args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}) in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cascade", description="Cascaded text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate an image with a small random-weight Kandinsky 2.2 checkpoint")
    p.add_argument("--prompt", default="a red cat on a blue sofa")
    p.add_argument("--output", default="demo.png")
    p.add_argument("--checkpoint", default="out/random-kandinsky", help="folder to build the checkpoint in")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
