"""The real server for tests: uvicorn on 127.0.0.1 with a free port, in a thread of the test process, serving
the built-in demo model. One engine (the models, loaded once) per test session, shared by every server."""
from __future__ import annotations

import base64
import io
import threading

import numpy as np
import PIL.Image

FAST = {"steps": 2, "prior_steps": 2}
PROMPT = "a red circle on a blue background"
_engine = None
_lock = threading.Lock()


def executor():
    """The session's executor over the demo model (built on first use)."""
    global _engine
    from cascade.server.engine import Engine
    from cascade.server.executor import LocalExecutor

    with _lock:
        if _engine is None:
            _engine = LocalExecutor(Engine(["demo"]))
        return _engine


class Server:
    """create_app(...) served by uvicorn in a daemon thread; `url` once it listens."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            self.thread.join(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def start(api_key=None, limits=None) -> Server:
    from cascade.server.app import create_app
    from cascade.server.images import Limits

    return Server(create_app(executor(), api_key, limits or Limits()))


def decode(b64: str):
    return PIL.Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def png_b64(image, **save) -> str:
    out = io.BytesIO()
    image.save(out, "png", **save)
    return base64.b64encode(out.getvalue()).decode()


def picture(size=64, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def bomb_png(side=5000) -> bytes:
    """A real PNG of side x side black pixels: a few kilobytes that decode to side² bytes."""
    out = io.BytesIO()
    PIL.Image.new("L", (side, side)).save(out, "png", optimize=False)
    return out.getvalue()


def lying_png(width=30000, height=30000) -> bytes:
    """A small PNG whose header claims width x height (CRC fixed), as a crafted bomb would."""
    import struct
    import zlib

    out = io.BytesIO()
    PIL.Image.new("L", (8, 8)).save(out, "png")
    data = bytearray(out.getvalue())
    ihdr = 8 + 8  # signature, then IHDR's length and type
    data[ihdr: ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12: ihdr + 13]))
    data[ihdr + 13: ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)
