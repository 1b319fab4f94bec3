"""The demo model's world: one filled shape of one colour on a uniform background of another (issue 6).

`world(seed)` is an endless, seeded stream of (image, caption, attributes); `read` recovers the attributes
from any image by plain image analysis, so `score` measures how well generated images follow their captions
without asking the model's own encoders.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator

import numpy as np

SIZE = 64
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
SIDES = (math.ceil(0.4 * SIZE), math.floor(0.7 * SIZE))  # side or diameter in pixels, both ends included
KEYS = ("shape_colour", "background_colour", "shape")
CAPTION = re.compile(r"a (\w+) (\w+) on a (\w+) background")
NAMES = list(COLOURS)
PALETTE = np.array(list(COLOURS.values()), np.float32)
# (fill of the bounding box, centroid height / box height); the upright triangle's centroid sits 2/3 down.
PROTOTYPES = {"square": (1.0, 0.5), "circle": (math.pi / 4, 0.5), "triangle": (0.5, 2 / 3)}


def caption(attributes: dict) -> str:
    a = attributes
    return f"a {a['shape_colour']} {a['shape']} on a {a['background_colour']} background"


def parse(text: str) -> dict:
    """Caption -> {shape_colour, shape, background_colour}; ValueError for anything outside the world."""
    m = CAPTION.fullmatch(text.strip())
    if m is None or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in COLOURS:
        raise ValueError(f"not a caption of the demo world: {text!r}")
    return {"shape_colour": m[1], "shape": m[2], "background_colour": m[3]}


def mask(shape: str, side: int, x: int, y: int) -> np.ndarray:
    """SIZE x SIZE boolean mask of a shape whose side x side bounding box has its top left at (x, y)."""
    yc, xc = np.mgrid[:SIZE, :SIZE] + 0.5  # pixel centres decide coverage
    u, v = xc - x - side / 2, yc - y  # from the box's vertical axis and from its top edge
    if shape == "circle":
        return u**2 + (v - side / 2) ** 2 <= (side / 2) ** 2
    box = (np.abs(u) <= side / 2) & (v >= 0) & (v <= side)
    # The triangle is upright and isosceles: apex at the top centre, base = height = side.
    return box if shape == "square" else box & (np.abs(u) <= v / 2)


def box(attributes: dict, grow: int = 0) -> np.ndarray:
    """SIZE x SIZE boolean mask of the shape's bounding box grown by `grow` pixels on every side (the
    region an inpainting test repaints)."""
    a, out = attributes, np.zeros((SIZE, SIZE), bool)
    out[max(0, a["y"] - grow) : a["y"] + a["side"] + grow, max(0, a["x"] - grow) : a["x"] + a["side"] + grow] = True
    return out


def draw(shape: str, shape_colour: str, background_colour: str, side: int, x: int, y: int) -> np.ndarray:
    """The world's image for these attributes: SIZE x SIZE x 3 uint8."""
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = COLOURS[background_colour]
    image[mask(shape, side, x, y)] = COLOURS[shape_colour]
    return image


def sample(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    """One (image, caption, attributes); colour pairs, shapes, sizes and positions equally likely."""
    fg = NAMES[rng.integers(len(NAMES))]
    bg = [n for n in NAMES if n != fg][rng.integers(len(NAMES) - 1)]
    shape = SHAPES[rng.integers(len(SHAPES))]
    side = int(rng.integers(SIDES[0], SIDES[1] + 1))
    x, y = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
    attributes = dict(shape=shape, shape_colour=fg, background_colour=bg, side=side, x=x, y=y)
    return draw(**attributes), caption(attributes), attributes


def world(seed: int = 0) -> Iterator[tuple[np.ndarray, str, dict]]:
    """Endless stream of samples; the same seed gives the same stream."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample(rng)


def snap(image) -> np.ndarray:
    """PIL image, uint8 array or float array in [0, 1] -> H x W indices of the nearest palette colours."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    a = a.astype(np.float32) * (255.0 if a.dtype.kind == "f" else 1.0)
    return ((PALETTE**2).sum(-1) - 2 * a @ PALETTE.T).argmin(-1)  # |a - p|^2 less the constant |a|^2


def majority(labels: np.ndarray) -> np.ndarray:
    """3 x 3 mode filter: isolated speckle joins its neighbours, edges stay where they are."""
    h, w = labels.shape
    votes = np.pad(np.eye(len(NAMES), dtype=np.int16)[labels], ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(votes[i : i + h, j : j + w] for i in range(3) for j in range(3)).argmax(-1)


def longest_run(present: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest run of True: the shape's extent along one axis, stray blobs ignored."""
    edges = np.diff(np.concatenate([[0], present.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    i = int(np.argmax(stops - starts))
    return int(starts[i]), int(stops[i])


def classify(shape_mask: np.ndarray) -> str | None:
    """Nearest prototype shape by fill ratio and centroid height within the mask's bounding box."""
    (y0, y1), (x0, x1) = longest_run(shape_mask.any(1)), longest_run(shape_mask.any(0))
    box = shape_mask[y0:y1, x0:x1]
    if not box.any():
        return None
    fill, centroid = box.mean(), (np.nonzero(box)[0].mean() + 0.5) / box.shape[0]
    # Shapes differ about half as much in centroid as in fill: weigh the centroid double.
    distance = {s: (fill - f) ** 2 + (2 * (centroid - c)) ** 2 for s, (f, c) in PROTOTYPES.items()}
    return min(distance, key=distance.get)


def read(image) -> dict:
    """{shape_colour, background_colour, shape} that an image shows (None where no shape is found).

    The background is the commonest snapped colour of the border, the shape's colour the commonest other.
    """
    labels = majority(snap(image))
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(NAMES)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(NAMES))
    counts[bg] = 0
    fg = int(counts.argmax())
    found = counts[fg] > 0
    return {"shape_colour": NAMES[fg] if found else None, "background_colour": NAMES[bg],
            "shape": classify(labels == fg) if found else None}


def score(images, captions) -> dict:
    """Fraction of images right on shape colour, background colour, shape, and on all three together."""
    pairs = [(parse(c), read(i)) for i, c in zip(images, captions, strict=True)]
    right = np.array([[want[k] == got[k] for k in KEYS] for want, got in pairs], bool).reshape(-1, len(KEYS))
    return {**{k: float(v) for k, v in zip(KEYS, right.mean(0))}, "all": float(right.all(1).mean())}
