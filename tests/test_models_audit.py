"""Drop-in audit: every model class builds what the reference class builds by default and what the
reference's own tests of these pipelines build (their dummy components, copied here as configurations),
with the reference's keys and shapes; what stays rejected is named in the error."""
import pytest
import torch
from conftest import assert_close, load
from tiny import perturb

import cascade
from cascade import models

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402
from diffusers.pipelines.deprecated.wuerstchen import (PaellaVQModel, WuerstchenDiffNeXt,  # noqa: E402
                                                       WuerstchenPrior)

REFERENCE = {"UnCLIPTextProjModel": UnCLIPTextProjModel, "WuerstchenPrior": WuerstchenPrior,
             "WuerstchenDiffNeXt": WuerstchenDiffNeXt, "PaellaVQModel": PaellaVQModel}

# The reference's tests of these pipelines (tests/pipelines/{unclip,kandinsky2_2,wuerstchen} and
# stable_diffusion_2/test_stable_diffusion_latent_upscale.py): their dummy models' arguments.
KANDINSKY_UNET = dict(out_channels=8,
                      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                      mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64),
                      layers_per_block=1, encoder_hid_dim=32, encoder_hid_dim_type="image_proj",
                      cross_attention_dim=32, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                      class_embed_type=None)
MOVQ = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
            num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
            vq_embed_dim=4)
UNCLIP_SUPER_RES = dict(sample_size=64, layers_per_block=1, in_channels=6, out_channels=3,
                        down_block_types=("ResnetDownsampleBlock2D",) * 2, block_out_channels=(32, 64),
                        up_block_types=("ResnetUpsampleBlock2D",) * 2)
CONFIGS = {
    # reference defaults (real sizes: built on the meta device)
    "UNet2DModel-defaults": ("UNet2DModel", {}),
    "VQModel-defaults": ("VQModel", {}),
    "AutoencoderKL-defaults": ("AutoencoderKL", {}),
    "PriorTransformer-defaults": ("PriorTransformer", {}),
    "UnCLIPTextProjModel-defaults": ("UnCLIPTextProjModel",
                                     dict(time_embed_dim=128, cross_attention_dim=100)),
    "WuerstchenPrior-defaults": ("WuerstchenPrior", {}),
    "WuerstchenDiffNeXt-defaults": ("WuerstchenDiffNeXt", {}),
    "PaellaVQModel-defaults": ("PaellaVQModel", {}),
    # the reference's test configurations
    "unclip-super-res": ("UNet2DModel", UNCLIP_SUPER_RES),
    "unclip-decoder": ("UNet2DConditionModel", dict(
        sample_size=32, in_channels=3, out_channels=6, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=100, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity")),
    "unclip-prior": ("PriorTransformer", dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32,
                                              num_layers=1)),
    "unclip-text-proj": ("UnCLIPTextProjModel", dict(clip_embeddings_dim=32, time_embed_dim=128,
                                                     cross_attention_dim=100)),
    "kandinsky-unet": ("UNet2DConditionModel",
                       dict(in_channels=4, addition_embed_type="image", **KANDINSKY_UNET)),
    "kandinsky-inpaint-unet": ("UNet2DConditionModel", dict(in_channels=9, addition_embed_type="image",
                                                            **KANDINSKY_UNET)),
    "kandinsky-controlnet-unet": ("UNet2DConditionModel",
                                  dict(in_channels=8, addition_embed_type="image_hint", **KANDINSKY_UNET)),
    "kandinsky-movq": ("VQModel", MOVQ),
    "kandinsky-controlnet-movq": ("VQModel", {
        **MOVQ, "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3}),
    "upscaler-unet": ("UNet2DConditionModel", dict(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=[32, 32, 64, 64],
        time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
        down_block_types=("KDownBlock2D",) + ("KCrossAttnDownBlock2D",) * 3,
        in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",))),
    "upscaler-vae": ("AutoencoderKL", dict(block_out_channels=[32, 32, 64, 64], in_channels=3, out_channels=3,
                                           down_block_types=["DownEncoderBlock2D"] * 4,
                                           up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4)),
    "wuerstchen-prior": ("WuerstchenPrior", dict(c_in=2, c=8, depth=2, c_cond=32, c_r=8, nhead=2)),
    "wuerstchen-vqgan": ("PaellaVQModel", dict(bottleneck_blocks=1, num_vq_embeddings=2)),
    "wuerstchen-decoder": ("WuerstchenDiffNeXt", dict(c_cond=32, c_hidden=[320], nhead=[-1], blocks=[4],
                                                      level_config=["CT"], clip_embd=32,
                                                      inject_effnet=[False])),
    # beyond the tests: the defaults' block types with scale-shift resnets, one-head attention
    "UNet2DModel-scale-shift": ("UNet2DModel", dict(block_out_channels=(16, 32), norm_num_groups=8,
                                                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                                    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                                    resnet_time_scale_shift="scale_shift",
                                                    attention_head_dim=None)),
}


def reference_class(name):
    return REFERENCE.get(name) or getattr(diffusers, name)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_reference_configurations_build_with_the_reference_layout(case):
    name, config = CONFIGS[case]
    with torch.device("meta"):
        ours, reference = getattr(models, name)(**config), reference_class(name)(**config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("case", ["UNet2DModel-scale-shift", "unclip-super-res"])
def test_unet2d_with_attention_matches_the_reference(case):
    config = {**CONFIGS[case][1], "sample_size": 16}
    torch.manual_seed(0)
    reference = perturb(diffusers.UNet2DModel(**config))
    ours = models.UNet2DModel(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, config.get("in_channels", 3), 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(x, 10).sample, reference(x, 10).sample, 1e-5)


def test_reference_unclip_folder_with_default_super_res_unets_loads_and_matches(unclip_root, tmp_path):
    """The reference's unCLIP tests build their super-resolution UNets with UNet2DModel's defaults (a mid
    block with attention): such a folder, saved by the reference, loads here and gives its images."""
    pipe = diffusers.UnCLIPPipeline.from_pretrained(unclip_root / "unclip")
    config = {**UNCLIP_SUPER_RES, "sample_size": 16}
    for seed, name in ((7, "super_res_first"), (8, "super_res_last")):
        torch.manual_seed(seed)
        setattr(pipe, name, perturb(diffusers.UNet2DModel(**config), seed))
        pipe.register_modules(**{name: getattr(pipe, name)})
    assert pipe.super_res_first.config.add_attention
    pipe.save_pretrained(tmp_path / "unclip")
    args = dict(prompt="a cat", prior_num_inference_steps=2, decoder_num_inference_steps=2,
                super_res_num_inference_steps=2, output_type="np")
    pipes = [load(lib, "UnCLIPPipeline", tmp_path / "unclip") for lib in (cascade, diffusers)]
    outs = [p(**args, generator=torch.Generator().manual_seed(0)) for p in pipes]
    assert_close(outs[0].images, outs[1].images, 1e-4)


@pytest.mark.parametrize("name, config, key", [
    # Stable Diffusion's transformer blocks: no checkpoint or test configuration of these pipelines has them.
    ("UNet2DConditionModel", {}, "down_block_types"),
    ("UNet2DModel", dict(class_embed_type="timestep"), "class_embed_type"),
    ("UNet2DModel", dict(time_embedding_type="fourier"), "time_embedding_type"),
    ("UNet2DModel", dict(attn_norm_num_groups=4), "attn_norm_num_groups"),
    ("UNet2DModel", dict(downsample_type="resnet"), "downsample_type"),
])
def test_what_no_checkpoint_uses_is_rejected_by_name(name, config, key):
    with pytest.raises(ValueError, match=key):
        getattr(models, name)(**config)
