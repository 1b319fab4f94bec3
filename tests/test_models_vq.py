"""The autoencoders, MoVQ (Kandinsky 2.2's VQModel) and AutoencoderKL, against the reference (diffusers)."""
import functools

import pytest
import torch
from conftest import assert_close
from safetensors.torch import save_file
from tiny import perturb

from cascade import presets
from cascade.models import AutoencoderKL, VQModel

diffusers = pytest.importorskip("diffusers")

# MoVQ's layout (attention in the last encoder and first decoder level, spatial norms) at tiny width; the SD
# VAE's (no attention but in the mid blocks, group norms).
TINY = dict(
    block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=64,
    down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], norm_type="spatial",
    up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=32,
)
TINY_KL = dict(block_out_channels=[32, 64], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32)
CLASSES = {"vq": (VQModel, "VQModel", TINY), "vq_group": (VQModel, "VQModel", {**TINY, "norm_type": "group"}),
           "kl": (AutoencoderKL, "AutoencoderKL", TINY_KL)}


@functools.cache
def pair(name="vq"):
    ours_class, ref_name, tiny = CLASSES[name]
    torch.manual_seed(0)
    reference = perturb(getattr(diffusers, ref_name)(**tiny))
    ours = ours_class(**tiny).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def image(batch=2, size=16, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["vq", "vq_group"])
def test_vq_encode_decode_match_reference(name):
    ours, reference = pair(name)
    x = image()
    with torch.no_grad():
        latents = reference.encode(x).latents
        assert_close(ours.encode(x).latents, latents, atol=1e-5)
        assert_close(ours.encode(x, return_dict=False)[0], latents, atol=1e-5)
        for force_not_quantize in (False, True):
            want = reference.decode(latents, force_not_quantize=force_not_quantize)
            got = ours.decode(latents, force_not_quantize=force_not_quantize)
            assert_close(got.sample, want.sample, atol=1e-5)
            assert_close(got.commit_loss, want.commit_loss, atol=1e-6)
            assert got["sample"] is got[0] is got.sample
        assert_close(ours(x).sample, reference(x).sample, atol=1e-5)
        assert_close(ours(x, return_dict=False)[0], reference(x, return_dict=False)[0], atol=1e-5)


def test_quantize_snaps_to_codebook():
    ours, _ = pair()
    index = torch.tensor([3, 7, 7, 1])
    entries = ours.quantize.embedding.weight[index]
    z_q, _ = ours.quantize(entries.T.reshape(1, 4, 2, 2) + 1e-4)
    assert_close(z_q.flatten(2)[0].T, entries, atol=1e-6)


def test_autoencoder_kl_matches_reference():
    ours, reference = pair("kl")
    x = image()
    with torch.no_grad():
        want, got = reference.encode(x).latent_dist, ours.encode(x).latent_dist
        for name in ("mean", "logvar", "std", "var"):
            assert_close(getattr(got, name), getattr(want, name), atol=1e-5)
        seed = torch.Generator().manual_seed
        assert_close(got.sample(seed(3)), want.sample(seed(3)), atol=1e-5)
        z = want.mode()
        assert_close(ours.decode(z).sample, reference.decode(z).sample, atol=1e-5)
        assert_close(ours.decode(z, return_dict=False)[0], reference.decode(z).sample, atol=1e-5)
        assert_close(ours(x).sample, reference(x).sample, atol=1e-5)
        assert_close(ours(x, sample_posterior=True, generator=seed(4)).sample,
                     reference(x, sample_posterior=True, generator=seed(4)).sample, atol=1e-5)


@pytest.mark.parametrize("name, real, millions", [("VQModel", presets.MOVQ, 67.83),
                                                  ("AutoencoderKL", presets.LATENT_UPSCALER_VAE, 83.65)])
def test_real_config_builds_with_reference_keys(name, real, millions):
    with torch.device("meta"):
        reference = getattr(diffusers, name)(**real)
        ours = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}[name](**real)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    assert ours.num_parameters() == reference.num_parameters()
    assert ours.num_parameters() / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize("name", ["vq", "kl"])
def test_checkpoints_cross_load(tmp_path, name):
    ours, reference = pair(name)
    reference.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    loaded = type(ours).from_pretrained(tmp_path / "ref")
    ref_loaded = type(reference).from_pretrained(tmp_path / "ours").eval()
    assert loaded.config == ours.config
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference.decode(z).sample
        assert_close(loaded.decode(z).sample, want, atol=1e-5)
        assert_close(ref_loaded.decode(z).sample, want, atol=1e-5)


def test_legacy_attention_key_names_load(tmp_path):
    """Checkpoints saved before diffusers 0.14 (query/key/value/proj_attn) load into the current names."""
    ours, _ = pair()
    renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    legacy = {}
    for k, v in ours.state_dict().items():
        for new, old in renames.items():
            k = k.replace(new, old)
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    ours.save_pretrained(tmp_path)
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = VQModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("change", [dict(norm_type="ada_group"), dict(lookup_from_codebook=True),
                                    dict(down_block_types=["DownBlock2D", "DownBlock2D"])])
def test_unsupported_config_is_rejected(change):
    with pytest.raises(ValueError):
        VQModel(**{**TINY, **change})
