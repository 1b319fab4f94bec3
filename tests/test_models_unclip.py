"""unCLIP's own models against the reference: the text projection and the super-resolution UNet2DModel, and
every Karlo preset on the meta device."""
import pytest
import torch
from conftest import assert_close
from tiny import perturb

from cascade import presets
from cascade.models import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as RefTextProj  # noqa: E402

TINY_TEXT_PROJ = dict(clip_extra_context_tokens=3, clip_embeddings_dim=16, time_embed_dim=24,
                      cross_attention_dim=20)
TINY_SUPER_RES = {**presets.KARLO_SUPER_RES, "block_out_channels": [16, 32, 32], "layers_per_block": 2,
                  "norm_num_groups": 8, "sample_size": 16, "up_block_types": ["ResnetUpsampleBlock2D"] * 3,
                  "down_block_types": ["ResnetDownsampleBlock2D"] * 3}


def pair(ours_cls, ref_cls, config):
    torch.manual_seed(0)
    reference = perturb(ref_cls(**config))
    ours = ours_cls(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


@pytest.mark.parametrize("guide", [False, True])
def test_text_proj_matches_reference(guide):
    ours, reference = pair(UnCLIPTextProjModel, RefTextProj, TINY_TEXT_PROJ)
    g = torch.Generator().manual_seed(1)
    rows = 4 if guide else 2
    args = dict(image_embeddings=torch.randn(2, 16, generator=g),
                prompt_embeds=torch.randn(rows, 16, generator=g),
                text_encoder_hidden_states=torch.randn(rows, 5, 16, generator=g),
                do_classifier_free_guidance=guide)
    with torch.no_grad():
        got, want = ours(**args), reference(**args)
    assert got[0].shape == (rows, 3 + 5, 20) and got[1].shape == (rows, 24)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, 1e-5)
    assert ours.clip_extra_context_tokens == 3


@pytest.mark.parametrize("timestep", [7, torch.tensor(999), torch.tensor([3, 500])])
def test_super_res_unet_matches_reference(timestep):
    ours, reference = pair(UNet2DModel, diffusers.UNet2DModel, TINY_SUPER_RES)
    sample = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(sample, timestep).sample
        assert_close(ours(sample, timestep).sample, want, 1e-5)
        assert_close(ours(sample, timestep, return_dict=False)[0], want, 1e-5)


def test_super_res_unet_cross_loads(tmp_path):
    ours, reference = pair(UNet2DModel, diffusers.UNet2DModel, TINY_SUPER_RES)
    reference.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    loaded = UNet2DModel.from_pretrained(tmp_path / "ref")
    ref_loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours").eval()
    assert loaded.config == ours.config
    sample = torch.randn(1, 6, 16, 16)
    with torch.no_grad():
        want = reference(sample, 5).sample
        assert_close(loaded(sample, 5).sample, want, 1e-5)
        assert_close(ref_loaded(sample, 5).sample, want, 1e-5)


def test_text_proj_cross_loads(tmp_path):
    ours, reference = pair(UnCLIPTextProjModel, RefTextProj, TINY_TEXT_PROJ)
    ours.save_pretrained(tmp_path / "ours")
    assert RefTextProj.from_pretrained(tmp_path / "ours").config["time_embed_dim"] == 24
    reference.save_pretrained(tmp_path / "ref")
    assert UnCLIPTextProjModel.from_pretrained(tmp_path / "ref").config == ours.config


@pytest.mark.parametrize("change", [dict(class_embed_type="timestep"), dict(time_embedding_type="learned"),
                                   dict(down_block_types=["SkipDownBlock2D"] * 3)])
def test_super_res_unet_rejects_options_it_does_not_implement(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        UNet2DModel(**{**TINY_SUPER_RES, **change})


KARLO = {  # preset: (ours, reference, parameters in millions)
    "KARLO_PRIOR": (PriorTransformer, diffusers.PriorTransformer, 1022.0),
    "KARLO_TEXT_PROJ": (UnCLIPTextProjModel, RefTextProj, 7.9),
    "KARLO_DECODER": (UNet2DConditionModel, diffusers.UNet2DConditionModel, 885.4),
    "KARLO_SUPER_RES": (UNet2DModel, diffusers.UNet2DModel, 691.6),
}


@pytest.mark.parametrize("preset", list(KARLO))
def test_karlo_presets_build_on_meta_with_reference_keys(preset):
    ours_cls, ref_cls, millions = KARLO[preset]
    config = getattr(presets, preset)
    with torch.device("meta"):
        ours, reference = ours_cls(**config), ref_cls(**config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    assert ours.num_parameters() / 1e6 == pytest.approx(millions, abs=0.05)
