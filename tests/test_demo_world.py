"""The demo world's generator (determinism, captions, constraints, coverage) and its image checker."""
import itertools
import math

import numpy as np
import pytest
from PIL import Image

from cascade import demo_world as dw


def take(n, seed=0):
    return list(itertools.islice(dw.world(seed), n))


@pytest.fixture(scope="module")
def samples():
    return take(1000)


def blur(image):
    """Separable [1, 2, 1] / 4 blur, edges repeated."""
    a = image.astype(np.float32)
    for axis in (0, 1):
        p = np.pad(a, [(1, 1) if i == axis else (0, 0) for i in range(3)], mode="edge")
        n = a.shape[axis]
        a = sum(w * np.take(p, range(i, i + n), axis=axis) for i, w in enumerate((0.25, 0.5, 0.25)))
    return a


def degrade(image, rng, sigma):
    return np.clip(blur(image) + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def test_same_seed_same_stream():
    a, b, c = take(20, seed=3), take(20, seed=3), take(20, seed=4)
    assert all(np.array_equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(a, b))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    rng = np.random.default_rng(3)
    assert np.array_equal(dw.sample(rng)[0], a[0][0])


def test_captions_grammar(samples):
    for _, text, attributes in samples:
        words = text.split(" ")
        assert len(words) == 7 and words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background"
        assert words[1] in dw.COLOURS and words[2] in dw.SHAPES and words[5] in dw.COLOURS
        want = {k: attributes[k] for k in dw.KEYS}
        assert dw.parse(text) == want and dw.caption(want) == text
    for bad in ("a purple circle on a red background", "a red hexagon on a blue background", "red circle"):
        with pytest.raises(ValueError):
            dw.parse(bad)


def test_constraints(samples):
    assert dw.SIDES == (26, 44)
    for image, _, a in samples:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 0.4 * 64 <= a["side"] <= 0.7 * 64 and a["shape_colour"] != a["background_colour"]
        fg = (image == dw.COLOURS[a["shape_colour"]]).all(-1)
        bg = (image == dw.COLOURS[a["background_colour"]]).all(-1)
        assert (fg | bg).all() and fg.any()
        rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
        # Inside the image and inside the drawn box; a triangle of even side may leave its apex row empty.
        assert a["x"] >= 0 and a["y"] >= 0 and a["x"] + a["side"] <= 64 and a["y"] + a["side"] <= 64
        assert (cols[0], cols[-1] + 1, rows[-1] + 1) == (a["x"], a["x"] + a["side"], a["y"] + a["side"])
        assert rows[0] - a["y"] <= (a["shape"] == "triangle")


def test_every_combination_reachable():
    seen = [attributes for _, _, attributes in take(3000, seed=1)]
    combos = {(a["shape_colour"], a["background_colour"], a["shape"]) for a in seen}
    assert len(combos) == 8 * 7 * 3
    assert {a["side"] for a in seen} == set(range(26, 45))
    assert {a["x"] for a in seen if a["side"] == 26} >= {0, 64 - 26}


def test_checker_on_own_images(samples):
    images, captions, _ = zip(*samples)
    result = dw.score(images, captions)
    print(f"checker on 1000 clean images: {result}")
    assert min(result.values()) >= 0.99, result


def test_checker_on_degraded_images(samples):
    # Measured 100% on all three at sigma 20 (1000 images); at sigma 60, shape 99.7% (these 300).
    rng = np.random.default_rng(0)
    images, captions, _ = zip(*samples)
    mild = dw.score([degrade(i, rng, 20) for i in images], captions)
    harsh = dw.score([degrade(i, rng, 60) for i in images[:300]], captions[:300])
    print(f"checker, blur + noise sigma 20/255: {mild}; sigma 60/255: {harsh}")
    assert min(mild.values()) >= 0.99, mild
    assert min(harsh.values()) >= 0.97, harsh


def test_checker_inputs_and_failures(samples):
    image, text, _ = samples[0]
    want = dw.read(image)
    assert dw.read(Image.fromarray(image)) == want == dw.read(image / 255.0)
    assert dw.read(np.zeros((64, 64, 3), np.uint8)) == {
        "shape_colour": None, "background_colour": "black", "shape": None}
    images, captions, _ = zip(*samples[:200])
    shifted = dw.score(images, captions[1:] + captions[:1])  # every caption belongs to another image
    assert max(shifted.values()) < 0.5 and math.isclose(dw.score(images, captions)["all"], 1.0)


def test_box_is_the_shapes_bounding_box_grown_and_clipped():
    a = dict(shape="circle", side=30, x=0, y=10)
    inner, grown = dw.box(a), dw.box(a, grow=2)
    assert inner.sum() == 30 * 30 and grown.sum() == (30 + 2) * (30 + 4)  # no room on the left
    assert not (dw.mask(a["shape"], a["side"], a["x"], a["y"]) & ~inner).any()
    assert (grown >= inner).all()
