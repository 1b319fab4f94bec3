"""Kandinsky 2.2 and Karlo decoder UNets and the shared Attention against the reference (diffusers)."""
import functools

import pytest
import torch
from conftest import assert_close
from tiny import perturb

from cascade import presets
from cascade.models import UNet2DConditionModel
from cascade.models.layers import Attention

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention as RefAttention  # noqa: E402
from diffusers.models.attention_processor import AttnAddedKVProcessor2_0  # noqa: E402

# Every block type, the added-k/v attention with its group-normed context, scale-shift resnets and both image
# embeddings of the real decoders, at a width where each attention has several heads.
TINY = dict(
    block_out_channels=[32, 64, 64], layers_per_block=2, attention_head_dim=8, cross_attention_dim=32,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_norm="group_norm", norm_num_groups=8,
    resnet_time_scale_shift="scale_shift", encoder_hid_dim=16, encoder_hid_dim_type="image_proj",
    addition_embed_type="image", in_channels=4, out_channels=8, sample_size=8,
)
# unCLIP's decoder: no image embeddings, the text projection's output comes as class_labels, a text mask.
TINY_KARLO = {**TINY, "class_embed_type": "identity", "encoder_hid_dim": None, "encoder_hid_dim_type": None,
              "addition_embed_type": None, "cross_attention_norm": None, "in_channels": 3, "out_channels": 6}
VARIANTS = {  # name: (tiny config, real config, parameters of the real model in millions)
    "decoder": (TINY, presets.KANDINSKY22_UNET, 1253.09),
    "inpaint": ({**TINY, "in_channels": 9}, presets.KANDINSKY22_INPAINT_UNET, 1253.11),
    "controlnet": ({**TINY, "addition_embed_type": "image_hint", "in_channels": 8},
                   presets.KANDINSKY22_CONTROLNET_UNET, 1253.46),
    "karlo": (TINY_KARLO, presets.KARLO_DECODER, 885.44),
}


def assert_same_layout(ours, reference):
    """The reference's state-dict keys and shapes, hence its parameter count."""
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    assert ours.num_parameters() == reference.num_parameters()


@functools.cache  # building the reference dominates; the tests only read the models
def pair(name):
    tiny = VARIANTS[name][0]
    torch.manual_seed(0)
    reference = perturb(diffusers.UNet2DConditionModel(**tiny)).eval()
    ours = UNet2DConditionModel(**tiny).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def inputs(name, batch=2, seed=1):
    """The sample and the keyword arguments after the timestep, for one variant."""
    g = torch.Generator().manual_seed(seed)
    in_channels = 4 if name == "controlnet" else VARIANTS[name][0]["in_channels"]
    sample = torch.randn(batch, in_channels, 8, 8, generator=g)
    if name == "karlo":
        mask = torch.ones(batch, 7, dtype=torch.bool)
        mask[0, 5:] = False
        return sample, dict(encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
                            class_labels=torch.randn(batch, 128, generator=g), attention_mask=mask)
    added = {"image_embeds": torch.randn(batch, 16, generator=g)}
    if name == "controlnet":
        added["hint"] = torch.randn(batch, 3, 64, 64, generator=g)
    return sample, dict(encoder_hidden_states=None, added_cond_kwargs=added)


# Every timestep form (int, float, 0-d, per-sample) on the decoder; one per-sample form on the others.
CALLS = [("decoder", t) for t in (7, 3.5, torch.tensor(999))]
CALLS += [(name, torch.tensor([10, 500])) for name in VARIANTS]


@pytest.mark.parametrize("name, timestep", CALLS)
def test_unet_matches_reference(name, timestep):
    ours, reference = pair(name)
    sample, kwargs = inputs(name)
    with torch.no_grad():
        want = reference(sample, timestep, **kwargs).sample
        got = ours(sample, timestep, **kwargs)
        assert_close(got.sample, want, atol=1e-5)
        assert got[0] is got["sample"] is got.sample
        assert_close(ours(sample, timestep, **kwargs, return_dict=False)[0], want, atol=1e-5)


def test_karlo_text_mask_is_used():
    ours, _ = pair("karlo")
    sample, kwargs = inputs("karlo")
    with torch.no_grad():
        masked = ours(sample, 3, **kwargs).sample
        kwargs.pop("attention_mask")
        assert (ours(sample, 3, **kwargs).sample - masked).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_real_config_builds_with_reference_keys(name):
    _, real, millions = VARIANTS[name]
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**real)
        ours = UNet2DConditionModel(**real)
    assert_same_layout(ours, reference)
    assert ours.num_parameters() / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize("name", ["controlnet", "karlo"])
def test_checkpoints_cross_load(tmp_path, name):
    ours, reference = pair(name)
    sample, kwargs = inputs(name)
    reference.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "ref")
    ref_loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    assert loaded.config == ours.config
    with torch.no_grad():
        want = reference(sample, 5, **kwargs).sample
        assert_close(loaded(sample, 5, **kwargs).sample, want, atol=1e-5)
        assert_close(ref_loaded(sample, 5, **kwargs).sample, want, atol=1e-5)


@pytest.mark.parametrize("change", [
    dict(down_block_types=["CrossAttnDownBlock2D"] * 3), dict(mid_block_type="UNetMidBlock2DCrossAttn"),
    dict(class_embed_type="timestep"), dict(encoder_hid_dim_type=None), dict(time_embedding_type="learned"),
])
def test_unsupported_config_is_rejected(change):
    with pytest.raises(ValueError):
        UNet2DConditionModel(**{**TINY, **change})


def test_missing_conditioning_is_a_clear_error():
    with pytest.raises(ValueError, match="image_embeds"):
        pair("decoder")[0](torch.zeros(1, 4, 8, 8), 1, None)
    with pytest.raises(ValueError, match="class_labels"):
        pair("karlo")[0](torch.zeros(1, 3, 8, 8), 1, torch.zeros(1, 7, 32))


# --- the shared Attention: the PriorTransformer's masked self-attention, cross-attention on feature maps,
# the added-k/v variant with a padded context mask, and the autoencoders' spatial-norm attention.
X, IMG, CTX = torch.randn(2, 10, 32), torch.randn(2, 32, 4, 4), torch.randn(2, 5, 16)
PAD = torch.zeros(2, 10).index_fill_(1, torch.arange(7, 10), -10000.0)
CTX_PAD = torch.zeros(2, 1, 5).index_fill_(2, torch.tensor([3, 4]), -10000.0)
CROSS = dict(hidden_states=IMG, encoder_hidden_states=CTX)
SELF = dict(query_dim=32, heads=4, dim_head=8, bias=True)
ADDED = dict(SELF, cross_attention_dim=32, added_kv_proj_dim=16, norm_num_groups=8,
             cross_attention_norm="group_norm", cross_attention_norm_num_groups=8)
ATTENTION_CASES = {  # name: (constructor arguments, call arguments)
    "self": (SELF, dict(hidden_states=X)),
    "self_mask_per_head": (SELF, dict(hidden_states=X, attention_mask=PAD.repeat_interleave(4, 0)[:, None])),
    "self_mask": (SELF, dict(hidden_states=X, attention_mask=PAD[:, None])),
    "cross_image": (dict(SELF, cross_attention_dim=16, bias=False), CROSS),
    "added_kv": (ADDED, CROSS),
    "added_kv_mask": (ADDED, dict(CROSS, attention_mask=CTX_PAD)),
    "added_kv_only_cross": (dict(ADDED, only_cross_attention=True), CROSS),
    "spatial_norm": (dict(query_dim=32, heads=1, dim_head=32, bias=True, spatial_norm_dim=3,
                          residual_connection=True, rescale_output_factor=2.0),
                     dict(hidden_states=IMG, temb=torch.randn(2, 3, 2, 2))),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference(case):
    kwargs, call = ATTENTION_CASES[case]
    torch.manual_seed(0)
    processor = {"processor": AttnAddedKVProcessor2_0()} if "added_kv_proj_dim" in kwargs else {}
    reference = perturb(RefAttention(**kwargs, **processor))
    ours = Attention(**kwargs).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(ours(**call), reference(**call), atol=1e-5)
