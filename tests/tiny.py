"""Tiny random components built with the reference library and saved in its on-disk format.

Every block type, attention and embedding path of the real checkpoints is kept; parameters the reference
initialises to a constant (zeros, ones) are perturbed with seeded noise so no code path hides.
"""
from __future__ import annotations

from pathlib import Path

import torch


def tokenizer(folder: Path):
    """A byte-level CLIP BPE tokenizer (cascade's demo one) with a few merges and 16 tokens of context."""
    from cascade.demo import byte_tokenizer

    tok = byte_tokenizer(folder, max_length=16, merges=("a t", "t h", "th e</w>", "c a", "ca t</w>", "d o",
                                                         "do g</w>"))
    return tok, len(tok)


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Constant-initialised tensors (zeros, ones) get seeded noise, so every path changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() > 0 and bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def clip_parts(root: Path, dim: int = 32, image_size: int = 32):
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    torch.manual_seed(0)
    tok, vocab = tokenizer(root / "_tok")
    text = CLIPTextModelWithProjection(CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                                      pad_token_id=vocab - 1, hidden_size=dim,
                                                      projection_dim=dim, intermediate_size=37,
                                                      num_attention_heads=4, num_hidden_layers=2,
                                                      vocab_size=vocab, max_position_embeddings=16)).eval()
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=dim, image_size=image_size,
                                                            projection_dim=dim, intermediate_size=37,
                                                            num_attention_heads=4, num_hidden_layers=2,
                                                            patch_size=8)).eval()
    processor = CLIPImageProcessor(crop_size=image_size, size=image_size, do_center_crop=True,
                                   do_normalize=True, do_resize=True, resample=3,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    return dict(tokenizer=tok, text_encoder=text, image_encoder=vision, image_processor=processor)


def kandinsky_prior(root: Path, dim: int = 32) -> Path:
    import diffusers as d

    parts = clip_parts(root, dim)
    torch.manual_seed(1)
    prior = perturb(d.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=dim,
                                       num_layers=1, num_embeddings=16), 1)
    scheduler = d.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                  num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0)
    pipe = d.KandinskyV22PriorPipeline(prior=prior, scheduler=scheduler, **parts)
    pipe.save_pretrained(root / "prior")
    return root / "prior"


def kandinsky_unet(in_channels=4, hint=False, dim=32):
    import diffusers as d

    torch.manual_seed(2)
    extra = dict(addition_embed_type="image_hint" if hint else "image", encoder_hid_dim=dim,
                 encoder_hid_dim_type="image_proj")
    unet = d.UNet2DConditionModel(
        in_channels=in_channels, out_channels=8, down_block_types=("ResnetDownsampleBlock2D",
                                                                   "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=dim, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        class_embed_type=None, addition_embed_type_num_heads=4, **extra)
    return perturb(unet, 2)


def movq():
    import diffusers as d

    torch.manual_seed(3)
    return perturb(d.VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D",
                                                                           "AttnDownEncoderBlock2D"],
                             in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                             norm_type="spatial", num_vq_embeddings=12, out_channels=3,
                             up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], vq_embed_dim=4), 3)


def ddpm():
    import diffusers as d

    return d.DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                           num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                           timestep_spacing="leading", variance_type="fixed_small")


def kandinsky_decoder(root: Path, kind: str = "text2img") -> Path:
    """kind: text2img (also img2img), inpaint, controlnet (also controlnet img2img)."""
    import diffusers as d

    unet = kandinsky_unet({"inpaint": 9, "controlnet": 8}.get(kind, 4), hint=kind == "controlnet")
    cls = {"text2img": d.KandinskyV22Pipeline, "inpaint": d.KandinskyV22InpaintPipeline,
           "controlnet": d.KandinskyV22ControlnetPipeline}[kind]
    cls(unet=unet, scheduler=ddpm(), movq=movq()).save_pretrained(root / kind)
    return root / kind


def kandinsky_combined(root: Path, kind: str = "text2img") -> Path:
    """A folder holding decoder and prior components, as the reference's combined save_pretrained writes it."""
    import diffusers as d

    prior = d.KandinskyV22PriorPipeline.from_pretrained(root / "prior")
    decoder = d.DiffusionPipeline.from_pretrained(root / ("inpaint" if kind == "inpaint" else "text2img"))
    cls = {"text2img": d.KandinskyV22CombinedPipeline, "img2img": d.KandinskyV22Img2ImgCombinedPipeline,
           "inpaint": d.KandinskyV22InpaintCombinedPipeline}[kind]
    pipe = cls(**decoder.components, **{f"prior_{k}": v for k, v in prior.components.items()})
    pipe.save_pretrained(root / f"combined_{kind}")
    return root / f"combined_{kind}"
