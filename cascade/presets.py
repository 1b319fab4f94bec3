"""The real checkpoints' configurations, as their `config.json` files state them.

Tests and benchmarks build real-size models from these (on the meta device, or with random weights);
`tiny()` shrinks one while keeping every block type, attention and embedding path.
"""
from __future__ import annotations

# --- Kandinsky 2.2 (kandinsky-community/kandinsky-2-2-prior, -decoder, -decoder-inpaint, -controlnet-depth)

KANDINSKY22_PRIOR = dict(
    num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=1280, num_embeddings=77,
    additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu", time_embed_dim=None,
    embedding_proj_dim=None, embedding_proj_norm_type=None, encoder_hid_proj_type="linear",
    added_emb_type="prd", norm_in_type=None, clip_embed_dim=None,
)

# kakaobrain/karlo-v1-alpha prior/: the PriorTransformer defaults (its config.json predates later options).
KARLO_PRIOR = dict(
    num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768, num_embeddings=77,
    additional_embeddings=4, dropout=0.0,
)

KANDINSKY22_UNET = dict(
    act_fn="silu", addition_embed_type="image", addition_embed_type_num_heads=64, attention_head_dim=64,
    block_out_channels=[384, 768, 1152, 1536], center_input_sample=False, class_embed_type=None,
    cross_attention_dim=768, cross_attention_norm="group_norm", downsample_padding=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"],
    encoder_hid_dim=1280, encoder_hid_dim_type="image_proj", flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=3, mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_eps=1e-5,
    norm_num_groups=32, out_channels=8, resnet_time_scale_shift="scale_shift", sample_size=64,
    up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"],
)

KANDINSKY22_INPAINT_UNET = {**KANDINSKY22_UNET, "in_channels": 9}

# The hint (4 channels after input_hint_block) is concatenated to the latents, hence in_channels 8; the image
# embedding still feeds both the time embedding and the cross-attention context (image_proj).
KANDINSKY22_CONTROLNET_UNET = {**KANDINSKY22_UNET, "addition_embed_type": "image_hint", "in_channels": 8}

# kakaobrain/karlo-v1-alpha decoder/: text_proj's output enters as class_labels (class_embed_type "identity").
KARLO_DECODER = dict(
    act_fn="silu", attention_head_dim=64, block_out_channels=[320, 640, 960, 1280],
    class_embed_type="identity", cross_attention_dim=1536, downsample_padding=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"],
    flip_sin_to_cos=True, freq_shift=0, in_channels=3, layers_per_block=3, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_eps=1e-5, norm_num_groups=32, out_channels=6,
    resnet_time_scale_shift="scale_shift", sample_size=64,
    up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"],
)

# kakaobrain/karlo-v1-alpha text_proj/: time_embed_dim is the decoder's (4 x 320), cross_attention_dim its
# context width.
KARLO_TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=1280,
                       cross_attention_dim=1536)

# kakaobrain/karlo-v1-alpha super_res_first/ and super_res_last/ (same architecture, different weights): the
# 64 px decoder image, upscaled, is concatenated to the noisy 256 px image, hence 6 input channels.
KARLO_SUPER_RES = dict(
    act_fn="silu", add_attention=False, attention_head_dim=8, block_out_channels=[320, 640, 960, 1280],
    center_input_sample=False, down_block_types=["ResnetDownsampleBlock2D"] * 4, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=6, layers_per_block=3, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=3, resnet_time_scale_shift="default", sample_size=256,
    time_embedding_type="positional", up_block_types=["ResnetUpsampleBlock2D"] * 4,
)

MOVQ = dict(
    act_fn="silu", block_out_channels=[128, 256, 256, 512],
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                      "AttnDownEncoderBlock2D"],
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, norm_type="spatial",
    num_vq_embeddings=16384, out_channels=3, sample_size=32, scaling_factor=0.18215,
    up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    vq_embed_dim=4,
)

# stabilityai/sd-x2-latent-upscaler vae/: the Stable Diffusion VAE (83.7 M parameters).
LATENT_UPSCALER_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    scaling_factor=0.18215, up_block_types=["UpDecoderBlock2D"] * 4,
)

# stabilityai/sd-x2-latent-upscaler unet/: k-diffusion's latent upscaler UNet (372.6 M parameters), as the
# reference's conversion of the original checkpoint configures it.
LATENT_UPSCALER_UNET = dict(
    in_channels=8, out_channels=5, block_out_channels=[384, 384, 768, 768], layers_per_block=4,
    down_block_types=["KDownBlock2D"] + ["KCrossAttnDownBlock2D"] * 3, mid_block_type=None,
    up_block_types=["KCrossAttnUpBlock2D"] * 3 + ["KUpBlock2D"], act_fn="gelu", norm_num_groups=None,
    cross_attention_dim=768, attention_head_dim=64, time_cond_proj_dim=896,
    resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
    conv_in_kernel=1, conv_out_kernel=1,
)

KANDINSKY22_PRIOR_SCHEDULER = dict(
    clip_sample=True, clip_sample_range=10.0, num_train_timesteps=1000, prediction_type="sample",
    variance_type="fixed_small_log",
)

KANDINSKY22_DECODER_SCHEDULER = dict(
    beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", thresholding=False,
    variance_type="fixed_small",
)

# --- Schedulers of kakaobrain/karlo-v1-alpha, warp-ai/wuerstchen(-prior), stabilityai/sd-x2-latent-upscaler

KARLO_PRIOR_SCHEDULER = dict(num_train_timesteps=1000, variance_type="fixed_small_log",
                             prediction_type="sample", clip_sample=True, clip_sample_range=5.0)
KARLO_DECODER_SCHEDULER = dict(num_train_timesteps=1000, variance_type="learned_range",
                               prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)
KARLO_SUPER_RES_SCHEDULER = {**KARLO_DECODER_SCHEDULER, "variance_type": "fixed_small_log"}

WUERSTCHEN_SCHEDULER = dict(scaler=1.0, s=0.008)

LATENT_UPSCALER_SCHEDULER = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
    prediction_type="sample", interpolation_type="linear", steps_offset=1,
)

# OpenCLIP ViT-bigG/14 image and text towers (transformers CLIP configs).
KANDINSKY22_IMAGE_ENCODER = dict(
    hidden_size=1664, intermediate_size=8192, num_attention_heads=16, num_hidden_layers=48, patch_size=14,
    image_size=224, projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5,
)
KANDINSKY22_TEXT_ENCODER = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                num_hidden_layers=32, projection_dim=1280, max_position_embeddings=77,
                                vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5,)

# --- Würstchen v2 (warp-ai/wuerstchen-prior prior/, warp-ai/wuerstchen decoder/ and vqgan/)

WUERSTCHEN_PRIOR = dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)

WUERSTCHEN_DECODER = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1024, c_hidden=[320, 640, 1280, 1280],
                          nhead=[-1, 10, 20, 20], blocks=[4, 4, 14, 4],
                          level_config=["CT", "CTA", "CTA", "CTA"], inject_effnet=[False, True, True, True],
                          effnet_embd=16, clip_embd=1024, kernel_size=3, dropout=0.1,)

WUERSTCHEN_VQGAN = dict(
    in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=12, embed_dim=384,
    latent_channels=4, num_vq_embeddings=8192, scale_factor=0.3764,
)
