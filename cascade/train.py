"""Training the demo model: a tiny Kandinsky 2.2 cascade learned from scratch on the demo world (issue 6).

Four stages run in order, each training one model while the earlier ones stay frozen: the CLIP text and
image encoders (contrastive), the MoVQ (reconstruction + commitment), the prior (text -> CLIP image
embedding, x0 objective) and the decoder UNet (epsilon objective on MoVQ latents). Every step's batch and
noise come from (seed, stage, step) alone, so a run is deterministic and a resumed run continues exactly.

    python -m cascade.train OUT_DIR [--minutes N] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import demo_world as dw
from . import presets
from .demo import byte_chars

log = logging.getLogger(__name__)
WORDS = ("a", "on", "background", *dw.COLOURS, *dw.SHAPES)
MAX_LENGTH = 16  # a caption is 7 words, plus the start and end tokens
DIM = 64  # CLIP embedding width, also the prior's and the decoder's conditioning width
STAGES = ("clip", "movq", "prior", "decoder")


def word_tokenizer(folder: Path, words=WORDS):
    """A CLIP tokenizer over bytes whose merges make each caption word one token; any text still encodes.

    Merges come in rounds: each joins, left to right, the pieces a word still splits into, so an earlier
    merge that cuts across a word (the "r e" of "red" inside "green") is built upon, not undone."""
    from transformers import CLIPTokenizer

    chars, merges = byte_chars(), []
    pieces = [[*w[:-1], w[-1] + "</w>"] for w in words]
    while any(len(p) > 1 for p in pieces):
        joins = (f"{''.join(p[:i])} {p[i]}" for p in pieces for i in range(1, len(p)))
        merges += [m for m in dict.fromkeys(joins) if m not in merges]
        vocab = dict.fromkeys([*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges),
                               "<|startoftext|>", "<|endoftext|>"])
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                  model_max_length=MAX_LENGTH)
        pieces = [tokenizer.tokenize(w) for w in words]
    return tokenizer


def build(seed: int = 0, width: int = 32) -> dict:
    """The untrained cascade as the combined pipeline's components; `width` is the first block width of the
    UNet and the MoVQ (the others are multiples of it)."""
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    from .models import PriorTransformer, UNet2DConditionModel, VQModel
    from .schedulers import DDPMScheduler, UnCLIPScheduler

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = word_tokenizer(Path(vocab))
    n, clip = len(tokenizer), dict(hidden_size=DIM, intermediate_size=4 * DIM, num_attention_heads=4,
                                   num_hidden_layers=2, projection_dim=DIM)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=n, max_position_embeddings=MAX_LENGTH, bos_token_id=n - 2, eos_token_id=n - 1,
        pad_token_id=n - 1, **clip))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=dw.SIZE, patch_size=8, **clip))
    prior = PriorTransformer(**{**presets.KANDINSKY22_PRIOR, "num_attention_heads": 4,
                                "attention_head_dim": DIM // 4, "num_layers": 2, "embedding_dim": DIM,
                                "num_embeddings": MAX_LENGTH})
    # MoVQ's spatial norms have 32 groups whatever the config says, so its widths stay multiples of 32.
    w, groups = width, dict(norm_num_groups=min(32, width))
    unet = UNet2DConditionModel(**{
        **presets.KANDINSKY22_UNET, "block_out_channels": (w, 2 * w, 3 * w, 4 * w), "layers_per_block": 1,
        "attention_head_dim": w // 2, "encoder_hid_dim": DIM, "cross_attention_dim": DIM,
        "addition_embed_type_num_heads": 16, "sample_size": dw.SIZE // 4, **groups})
    # Three MoVQ levels: 64 x 64 images <-> 16 x 16 latents.
    movq = VQModel(**{
        **presets.MOVQ, "block_out_channels": tuple(max(32, c) for c in (w, 2 * w, 2 * w)),
        "layers_per_block": 1, "num_vq_embeddings": 256, **groups,
        "down_block_types": presets.MOVQ["down_block_types"][1:],
        "up_block_types": presets.MOVQ["up_block_types"][1:]})
    return dict(unet=unet, scheduler=DDPMScheduler(**presets.KANDINSKY22_DECODER_SCHEDULER), movq=movq,
                prior_prior=prior, prior_image_encoder=vision, prior_text_encoder=text,
                prior_tokenizer=tokenizer,
                prior_scheduler=UnCLIPScheduler(**presets.KANDINSKY22_PRIOR_SCHEDULER),
                prior_image_processor=CLIPImageProcessor(size={"shortest_edge": dw.SIZE},
                                                         crop_size={"height": dw.SIZE, "width": dw.SIZE}))


# --------------------------------------------------------------------------------------------- batches

def world_batch(seed: int, step: int, size: int = 16) -> dict:
    """Batch `step` of a run: world images in [0, 255] (NCHW float), captions, and a generator for noise."""
    rng = np.random.default_rng([seed, step])
    images, captions, _ = zip(*(dw.sample(rng) for _ in range(size)))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return dict(pixels=pixels, captions=list(captions),
                generator=torch.Generator().manual_seed(int(rng.integers(2**62))))


def clip_pixels(parts: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The image processor's normalisation on tensors (the images already have the encoder's size)."""
    p = parts["prior_image_processor"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (p.image_mean, p.image_std))
    return (pixels / 255 - mean) / std


def text_states(parts: dict, captions: list[str]) -> dict:
    from .pipelines.core import encode_text

    return encode_text(parts["prior_tokenizer"], parts["prior_text_encoder"], captions, None, 1, False)


def image_embeds(parts: dict, pixels: torch.Tensor) -> torch.Tensor:
    return parts["prior_image_encoder"](clip_pixels(parts, pixels)).image_embeds


# --------------------------------------------------------------------------------------------- losses

def clip_loss(parts: dict, batch: dict, scale: float = 10.0) -> torch.Tensor:
    """Symmetric contrastive loss; images that share a caption are all right answers for it."""
    text = F.normalize(text_states(parts, batch["captions"])["prompt_embeds"], dim=-1)
    image = F.normalize(image_embeds(parts, batch["pixels"]), dim=-1)
    logits = scale * text @ image.T
    same = torch.tensor([[a == b for b in batch["captions"]] for a in batch["captions"]], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def movq_loss(parts: dict, batch: dict) -> torch.Tensor:
    x = batch["pixels"] / 127.5 - 1
    out = parts["movq"](x)
    return F.l1_loss(out.sample, x) + out.commit_loss.mean()


def noised(scheduler, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x_t, t, noise) with t uniform over the training timesteps."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return scheduler.add_noise(x0, noise, t), t, noise


def prior_loss(parts: dict, batch: dict, p_uncond: float = 0.1) -> torch.Tensor:
    """The prior predicts the normalised image embedding x0; empty captions teach its unconditional side."""
    prior, g = parts["prior_prior"], batch["generator"]
    keep = torch.rand(len(batch["captions"]), generator=g) >= p_uncond
    with torch.no_grad():
        text = text_states(parts, [c if k else "" for c, k in zip(batch["captions"], keep)])
        x0 = (image_embeds(parts, batch["pixels"]) - prior.clip_mean) / prior.clip_std
    x_t, t, _ = noised(parts["prior_scheduler"], x0, g)
    pred = prior(x_t, timestep=t, proj_embedding=text["prompt_embeds"],
                 encoder_hidden_states=text["text_encoder_hidden_states"], attention_mask=text["text_mask"])
    return F.mse_loss(pred.predicted_image_embedding, x0)


def decoder_loss(parts: dict, batch: dict, p_uncond: float = 0.1) -> torch.Tensor:
    """Epsilon loss on the latent channels of the output (the rest is the learned variance, left untrained);
    the all-zeros image's embedding, the pipelines' negative, stands in for "no condition"."""
    g = batch["generator"]
    with torch.no_grad():
        latents = parts["movq"].encode(batch["pixels"] / 127.5 - 1).latents
        embeds = image_embeds(parts, batch["pixels"])
        zero = parts["prior_image_encoder"](torch.zeros(1, 3, dw.SIZE, dw.SIZE)).image_embeds
    drop = (torch.rand(embeds.shape[0], generator=g) < p_uncond)[:, None]
    x_t, t, noise = noised(parts["scheduler"], latents, g)
    cond = {"image_embeds": torch.where(drop, zero, embeds)}
    eps = parts["unet"](x_t, t, encoder_hidden_states=None, added_cond_kwargs=cond).sample
    return F.mse_loss(eps[:, : latents.shape[1]], noise)


# --------------------------------------------------------------------------------------------- training

@dataclass
class Stage:
    name: str
    model: torch.nn.Module
    loss: Callable[[dict], torch.Tensor]  # batch -> loss
    batch: Callable[[int], dict]  # step -> batch
    lr: float = 1e-3
    prepare: Callable[[], None] | None = None  # before the first step of a fresh start


def stages(parts: dict, seed: int = 0, batch_size: int = 16) -> list[Stage]:
    def batches(i):
        return lambda step: world_batch(seed + 1000 * i, step, batch_size)

    clip = torch.nn.ModuleList([parts["prior_text_encoder"], parts["prior_image_encoder"]])
    models = dict(clip=clip, movq=parts["movq"], prior=parts["prior_prior"], decoder=parts["unet"])
    losses = dict(clip=clip_loss, movq=movq_loss, prior=prior_loss, decoder=decoder_loss)
    stats = dict(prior=lambda: set_clip_stats(parts, world_batch(seed + 1000 * len(STAGES), 0, 256)))
    return [Stage(name, models[name], partial(losses[name], parts), batches(i),
                  3e-4 if name == "prior" else 1e-3, stats.get(name)) for i, name in enumerate(STAGES)]


def train(stage: Stage, folder: Path, steps: int | None = None, minutes: float | None = None,
          resume: bool = True, save_every: float = 60.0) -> list[float]:
    """Train one stage until `steps` or `minutes` run out, checkpointing to folder/<name>.pt; returns the
    losses of the steps taken. A finished stage is not trained again unless `steps` asks for more."""
    if steps is None and not minutes:
        raise ValueError("train: give steps, minutes or both")
    if stage.prepare is not None:
        stage.prepare()  # a checkpoint loaded below overrides what it sets
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    path, step, losses = Path(folder) / f"{stage.name}.pt", 0, []
    if resume and path.exists():
        state = torch.load(path, weights_only=True)
        stage.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        if state["done"] and (steps is None or step >= steps):
            return losses
    start = saved = logged = time.monotonic()
    deadline = start + 60 * minutes if minutes else math.inf
    stage.model.train()
    while step < (steps if steps is not None else math.inf) and time.monotonic() < deadline:
        loss = stage.loss(stage.batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if time.monotonic() - logged > 10 or step == steps:
            log.info("%s step %d loss %.4f (%.0f s)", stage.name, step, losses[-1], time.monotonic() - start)
            logged = time.monotonic()
        if time.monotonic() - saved > save_every:
            save(path, stage, opt, step, False)
            saved = time.monotonic()
    save(path, stage, opt, step, True)
    return losses


def save(path: Path, stage: Stage, opt, step: int, done: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # a kill while writing leaves the previous checkpoint intact
    torch.save(dict(model=stage.model.state_dict(), optimizer=opt.state_dict(), step=step, done=done), tmp)
    tmp.replace(path)


def freeze(model: torch.nn.Module):
    model.eval().requires_grad_(False)


@torch.no_grad()
def set_clip_stats(parts: dict, batch: dict):
    """The prior works on standardised embeddings: its clip_mean / clip_std are the data's statistics."""
    embeds = image_embeds(parts, batch["pixels"])
    prior = parts["prior_prior"]
    prior.clip_mean.copy_(embeds.mean(0, keepdim=True))
    prior.clip_std.copy_(embeds.std(0, keepdim=True))
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)


def train_all(folder, minutes_per_stage: float | dict | None = None, steps: int | dict | None = 1000,
              seed: int = 0, resume: bool = True, batch_size: int = 16, width: int = 32):
    """Train the four stages in order, then save the KandinskyV22CombinedPipeline to `folder` (stage
    checkpoints go to folder/stages). Budgets are per stage: one number for all or {stage name: number}."""
    from .pipelines.kandinsky import KandinskyV22CombinedPipeline

    folder = Path(folder)
    parts = build(seed, width)
    for stage in stages(parts, seed, batch_size):
        budgets = (b.get(stage.name) if isinstance(b, dict) else b for b in (steps, minutes_per_stage))
        train(stage, folder / "stages", *budgets, resume)
        freeze(stage.model)
    pipe = KandinskyV22CombinedPipeline(**parts)
    pipe.save_pretrained(folder)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cascade.train", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--minutes", type=float, default=None, help="time budget per stage")
    parser.add_argument("--steps", type=int, default=None, help="steps per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = args.steps if args.steps is not None or args.minutes is not None else 1000
    train_all(args.out_dir, args.minutes, steps, args.seed, not args.no_resume)


if __name__ == "__main__":
    main()
