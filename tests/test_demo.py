"""The built-in demo cascade (issue 6): small, loads by the name `demo` in every Kandinsky 2.2 pipeline and
in the CLI as float32, and draws what it is asked (checked by plain image analysis, not its own encoders)."""
import itertools

import numpy as np
import PIL.Image
import pytest
import torch

from cascade import (KandinskyV22CombinedPipeline, KandinskyV22InpaintCombinedPipeline, KandinskyV22Pipeline,
                     KandinskyV22PriorPipeline, UNet2DConditionModel, WuerstchenCombinedPipeline)
from cascade import demo_world as dw
from cascade.cli import main
from cascade.loading import BUILTIN


@pytest.fixture(scope="module")
def pipe():
    return KandinskyV22CombinedPipeline.from_pretrained("demo")


def test_ships_in_25_mb_of_float16():
    files = [f for f in BUILTIN.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25_000_000
    assert {f.parent.parent.name for f in files if f.suffix == ".safetensors"} == {"demo", "demo-prior",
                                                                                     "demo-inpaint"}


def test_draws_its_captions_at_every_default(pipe):
    """Eight captions of a stream the training never saw, every argument at its default but the size."""
    captions = [c for _, c, _ in itertools.islice(dw.world(99), 8)]
    images = pipe(captions, height=dw.SIZE, width=dw.SIZE,
                  generator=[torch.Generator().manual_seed(i) for i in range(8)]).images
    assert all(i.size == (dw.SIZE, dw.SIZE) for i in images)
    score = dw.score(images, captions)
    assert score["shape_colour"] >= 7 / 8 and score["background_colour"] >= 7 / 8 and score["shape"] >= 5 / 8


def test_every_part_loads_by_name_as_float32(pipe):
    assert pipe.unet.dtype == pipe.movq.dtype == pipe.prior_prior.dtype == torch.float32
    assert pipe.prior_text_encoder.dtype == torch.float32
    assert pipe.unet.config.in_channels == 4
    inpaint = KandinskyV22InpaintCombinedPipeline.from_pretrained("demo")
    assert inpaint.unet.config.in_channels == 9 and inpaint.unet.dtype == torch.float32
    prior = KandinskyV22PriorPipeline.from_pretrained("demo")
    assert prior.prior.dtype == torch.float32
    assert KandinskyV22Pipeline.from_pretrained("demo", torch_dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    unet = UNet2DConditionModel.from_pretrained("demo", subfolder="unet")
    assert unet.dtype == torch.float32
    torch.testing.assert_close(unet.state_dict(), pipe.unet.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="demo.*WuerstchenCombinedPipeline"):
        WuerstchenCombinedPipeline.from_pretrained("demo")


def test_inpainting_recolours_the_shape():
    """Four world images, the shape's box repainted with a caption naming a new shape colour."""
    sources, targets, masks = [], [], []
    for image, _, a in itertools.islice(dw.world(5), 4):
        colour = next(c for c in dw.NAMES if c not in (a["shape_colour"], a["background_colour"]))
        sources.append(PIL.Image.fromarray(image))
        targets.append(dw.caption({**a, "shape_colour": colour}))
        masks.append(dw.box(a, grow=2).astype(np.float32))
    pipe = KandinskyV22InpaintCombinedPipeline.from_pretrained("demo")
    images = pipe(targets, sources, masks, height=dw.SIZE, width=dw.SIZE,
                  generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
    score = dw.score(images, targets)
    assert score["shape_colour"] >= 3 / 4 and score["background_colour"] == 1


def test_cli_demo_and_generate_use_the_trained_size(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "a white square on a black background", "--output", str(out)]) == 0
    image = PIL.Image.open(out)
    assert image.size == (dw.SIZE, dw.SIZE)
    assert (dw.read(image)["shape_colour"], dw.read(image)["background_colour"]) == ("white", "black")
    code = main(["generate", "demo", "a red circle on a green background", "--steps", "10", "--seed", "1",
                 "-q", "--out", str(tmp_path)])
    written = capsys.readouterr().out.split()
    assert code == 0 and PIL.Image.open(written[-1]).size == (dw.SIZE, dw.SIZE)
    assert main(["demo", "a cat on a sofa", "--output", str(out)]) == 0  # outside the world: a note, an image
    assert "knows one world" in capsys.readouterr().err
