"""`cascade serve`: a web page and the HTTP APIs image tools speak (AUTOMATIC1111, OpenAI, our own job API)
over the job layer. Needs the `serve` extra (FastAPI, uvicorn); the rest of cascade never imports it."""
from __future__ import annotations

import argparse
import sys

from .images import Limits

EXTRA = "cascade serve needs FastAPI and uvicorn: pip install 'cascade-diffusion[serve]'"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("models", nargs="+", metavar="MODEL", help="pipeline folders, Hub repo ids, or demo; "
                   "the first is the default")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                   "needs --api-key)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, AUTOMATIC1111's)")
    p.add_argument("--api-key", metavar="KEY", help="every API request must send 'Authorization: Bearer KEY'")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="weights' dtype")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1, mps, ...")
    p.add_argument("--max-images", type=int, default=Limits.images, metavar="N", help="images per request")
    p.add_argument("--max-side", type=int, default=Limits.side, metavar="PX", help="output width or height")
    from .ray_serve import add_arguments as add_ray_arguments

    return add_ray_arguments(p)


def add_parser(sub) -> argparse.ArgumentParser:
    """The `serve` subcommand on the `cascade` command's subparsers (nothing here imports FastAPI)."""
    text = "serve models over HTTP: a web page, AUTOMATIC1111's and OpenAI's image APIs (the serve extra)"
    p = add_arguments(sub.add_parser("serve", help=text, description=text))
    p.set_defaults(run=serve)
    return p


def check_host(host: str, api_key: str | None) -> None:
    from .guard import loopback

    if not loopback(host) and not api_key:
        raise ValueError(f"--host {host}: serving beyond this machine needs --api-key KEY (clients then send "
                         "'Authorization: Bearer KEY')")


def build(models: list[str], api_key: str | None = None, limits: Limits = Limits(), dtype=None, device=None):
    """(the ASGI app, its executor): every model loaded once, the worker started."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RuntimeError(EXTRA) from None
    from .app import create_app
    from .engine import Engine
    from .executor import LocalExecutor

    executor = LocalExecutor(Engine(models, dtype, device))
    return create_app(executor, api_key, limits), executor


def serve(args) -> int:
    """The `cascade serve` subcommand (args from add_arguments)."""
    check_host(args.host, args.api_key)
    limits = Limits(images=args.max_images, side=args.max_side)
    print(f"loading {', '.join(args.models)}", file=sys.stderr)
    if args.ray is not None:  # the same app in front of Ray Serve replicas
        from .ray_serve import build as build_on_ray

        app, executor = build_on_ray(args, limits)
    else:
        app, executor = build(args.models, args.api_key, limits, args.dtype, args.device)
    import uvicorn

    print(f"cascade serving {', '.join(executor.served)} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    executor.close()
    return 0


def main(argv=None) -> int:
    """`python -m cascade.server MODEL ...`: the same as `cascade serve MODEL ...`."""
    args = add_arguments(argparse.ArgumentParser(prog="cascade serve")).parse_args(argv)
    try:
        return serve(args)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"cascade serve: error: {error}", file=sys.stderr)
        return 1
