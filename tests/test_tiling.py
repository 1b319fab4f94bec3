"""Tiled and sliced decoding (cascade/models/tiling.py, cascade/pipelines/vae.py), and loads that compute
no initialiser."""
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade import AutoencoderKL, KandinskyV22Pipeline, KandinskyV22PriorPipeline, PaellaVQModel, VQModel
from cascade import demo_world as dw
from cascade.loading import builtin

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def movq():
    """The demo's trained MoVQ (latents at a quarter of the pixels) and latents of a 128 px world grid."""
    m = VQModel.from_pretrained(builtin("demo") / "movq", torch_dtype=torch.float32)
    images = [i for i, _, _ in itertools.islice(dw.world(3), 4)]
    grid = np.concatenate([np.concatenate(images[:2], 1), np.concatenate(images[2:], 1)], 0)
    x = torch.from_numpy(grid).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        return m, m.encode(x).latents


def decode(model, z):
    with torch.no_grad():
        return model.decode(z, return_dict=False)[0] if isinstance(model, AutoencoderKL) else \
            model.decode(z, force_not_quantize=True).sample


def test_tiled_decode_is_close_and_shows_no_seam(movq):
    m, z = movq
    untiled = decode(m, z)
    m.enable_tiling(24, 8)  # tiles at latents 0..24 and 8..32 on each axis
    try:
        tiled = decode(m, z)
    finally:
        m.disable_tiling()
    diff = (tiled - untiled).abs()
    # Each tile's group norms see a quarter of a 2 x 2 grid of different pictures: a hard case.
    assert diff.mean() < 0.05 and diff.max() < 0.3, (diff.mean(), diff.max())
    # A seam would be a jump at a tile's edge (latents 8 and 24, pixels 32 and 96): the difference to the
    # untiled decode there is no larger than elsewhere.
    for profile in (diff.mean((0, 1, 2)), diff.mean((0, 1, 3))):
        edges = profile[[31, 32, 95, 96]]
        assert edges.max() < 2 * profile.mean(), (edges, profile.mean())


def test_disable_restores_the_exact_output_and_small_latents_are_not_tiled(movq):
    m, z = movq
    before = decode(m, z)
    m.enable_tiling(32, 8)  # the whole latent fits one tile: plain decode
    assert torch.equal(decode(m, z), before)
    m.enable_tiling(16, 4)
    assert not torch.equal(decode(m, z), before)
    m.disable_tiling()
    assert torch.equal(decode(m, z), before)


def test_slicing_decodes_each_sample_alone(movq):
    m, z = movq
    batch = torch.cat([z, z.flip(-1), z.flip(-2)])
    whole = decode(m, batch)
    m.enable_slicing()
    sliced = decode(m, batch)
    m.disable_slicing()
    one_by_one = torch.cat([decode(m, part) for part in batch.split(1)])
    assert torch.equal(sliced, one_by_one)
    # The batched convolutions round differently from batch-of-one ones, nothing more.
    assert (sliced - whole).abs().max() < 1e-3
    assert torch.equal(decode(m, batch), whole)


def test_paella_tiles_match_where_the_receptive_field_fits():
    torch.manual_seed(0)
    m = PaellaVQModel(embed_dim=32, bottleneck_blocks=1, num_vq_embeddings=16).eval()
    z = torch.randn(1, 4, 40, 40)
    untiled = decode(m, z)
    m.enable_tiling(16, 8)
    diff = (decode(m, z) - untiled).abs()
    assert diff.max() < 1e-4 * untiled.abs().max(), diff.max()


def test_autoencoder_kl_tiles():
    torch.manual_seed(0)
    m = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8).eval()
    z = torch.randn(2, 4, 24, 24)
    untiled = decode(m, z)
    m.enable_tiling(16, 6)
    diff = (decode(m, z) - untiled).abs()
    # Random weights make every tile's group-norm statistics differ much more than a trained VAE's do.
    assert diff.mean() < 0.2 * untiled.abs().mean(), (diff.mean(), untiled.abs().mean())


@pytest.mark.parametrize("kwargs, name", [({"tile_size": 1}, "tile_size"), ({"overlap": 40}, "overlap"),
                                          ({"overlap": 2.5}, "overlap")])
def test_bad_tiling_arguments_name_the_parameter(kwargs, name):
    pipe = KandinskyV22Pipeline.from_pretrained("demo")
    with pytest.raises(ValueError, match=name):
        pipe.enable_vae_tiling(**kwargs)


def test_pipeline_switches_reach_the_movq():
    pipe = KandinskyV22Pipeline.from_pretrained("demo")
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, pipe.unet.config.encoder_hid_dim, generator=torch.Generator().manual_seed(0))
    args = dict(image_embeds=embeds, negative_image_embeds=-embeds, height=64, width=64,
                num_inference_steps=2,
                output_type="np")

    def run():
        return pipe(**args, generator=torch.Generator().manual_seed(0)).images

    plain = run()
    pipe.enable_vae_tiling(8, 2)
    pipe.enable_vae_slicing()
    assert pipe.movq.use_tiling and pipe.movq.tile_size == 8 and pipe.movq.use_slicing
    tiled = run()
    assert 0 < np.abs(tiled - plain).max() < 0.5
    pipe.disable_vae_tiling()
    pipe.disable_vae_slicing()
    assert np.array_equal(run(), plain)


def test_a_pipeline_without_an_image_decoder_says_so():
    pipe = KandinskyV22PriorPipeline.from_pretrained("demo")
    with pytest.raises(ValueError, match="no image decoder"):
        pipe.enable_vae_tiling()


def test_loading_computes_no_initialiser(tmp_path):
    """nn.init on the meta device imports torch._dynamo (seconds); a load must not run any initialiser."""
    torch.manual_seed(0)
    PaellaVQModel(embed_dim=32, bottleneck_blocks=1, num_vq_embeddings=16).save_pretrained(tmp_path / "vq")
    code = ("import sys, cascade\n"
            "cascade.KandinskyV22Pipeline.from_pretrained('demo')\n"
            f"cascade.PaellaVQModel.from_pretrained({str(tmp_path / 'vq')!r})\n"
            "assert 'torch._dynamo' not in sys.modules, 'a load imported torch._dynamo'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
