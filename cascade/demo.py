"""A small Kandinsky 2.2 checkpoint with random weights, built and saved locally.

It exercises every component and block type of the real checkpoints at a fraction of their width, so the
whole cascade (prior -> decoder -> MoVQ) runs in seconds on a CPU with no download. Its images are noise
shaped by random weights, not pictures of the prompt.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from . import presets


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table: printable bytes map to themselves, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def byte_tokenizer(folder: Path, max_length: int = 77, merges=("t h", "th e</w>", "c a", "ca t</w>")):
    """A CLIP BPE tokenizer over single bytes (plus a few merges): any text encodes, nothing downloads."""
    from transformers import CLIPTokenizer

    chars = byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab = list(dict.fromkeys(vocab + ["<|startoftext|>", "<|endoftext|>"]))  # merges may repeat a token
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def random_kandinsky(folder: Path, seed: int = 0) -> Path:
    """Build and save a reduced-width KandinskyV22CombinedPipeline with random weights."""
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    from .models import PriorTransformer, UNet2DConditionModel, VQModel
    from .pipelines.kandinsky import KandinskyV22CombinedPipeline
    from .schedulers import DDPMScheduler, UnCLIPScheduler

    torch.manual_seed(seed)
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = byte_tokenizer(Path(vocab))
    dim = 64
    text = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim,
                                                      intermediate_size=4 * dim, num_attention_heads=4,
                                                      num_hidden_layers=2, projection_dim=dim,
                                                      bos_token_id=len(tokenizer) - 2,
                                                      eos_token_id=len(tokenizer) - 1,
                                                      pad_token_id=len(tokenizer) - 1))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=dim, intermediate_size=4 * dim, num_attention_heads=4, num_hidden_layers=2, image_size=64,
        patch_size=16, projection_dim=dim))
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    prior = PriorTransformer(**{**presets.KANDINSKY22_PRIOR, "num_attention_heads": 4,
                                "attention_head_dim": 16, "num_layers": 2, "embedding_dim": dim})
    unet = UNet2DConditionModel(**{**presets.KANDINSKY22_UNET, "block_out_channels": (32, 64, 96, 128),
                                   "layers_per_block": 1, "attention_head_dim": 16, "encoder_hid_dim": dim,
                                   "cross_attention_dim": 64, "addition_embed_type_num_heads": 16})
    movq = VQModel(**{**presets.MOVQ, "block_out_channels": (32, 64, 64, 128), "layers_per_block": 1,
                      "num_vq_embeddings": 256})
    with torch.no_grad():  # the prior's learned embeddings start at zero; give them values so they matter
        for p in (prior.positional_embedding, prior.prd_embedding, prior.clip_mean):
            p.normal_(0, 0.02)
    pipe = KandinskyV22CombinedPipeline(
        unet=unet, scheduler=DDPMScheduler(**presets.KANDINSKY22_DECODER_SCHEDULER), movq=movq, prior_prior=prior,
        prior_image_encoder=vision, prior_text_encoder=text, prior_tokenizer=tokenizer,
        prior_scheduler=UnCLIPScheduler(**presets.KANDINSKY22_PRIOR_SCHEDULER), prior_image_processor=processor)
    pipe.save_pretrained(folder)
    return folder
