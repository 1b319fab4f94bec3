"""Training the demo model: a tiny Kandinsky 2.2 cascade learned from scratch on the demo world (issue 6).

Five stages run in order, each training one model while the earlier ones stay frozen: the CLIP text and
image encoders (contrastive), the MoVQ (reconstruction of unquantized latents), the prior (text -> CLIP
image embedding, x0 objective), the decoder UNet (v objective on MoVQ latents, conditioned on image
embeddings or the prior's samples) and the inpainting decoder (the decoder with masked-image inputs,
fine-tuned). Every step's batch and noise come from (seed, stage, step) alone, so a run is deterministic
and a resumed run continues exactly. `train_all` then writes the demo-prior, demo and demo-inpaint
checkpoint folders.

    python -m cascade.train OUT_DIR [--minutes N] [--steps N] [--float16]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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
STAGES = ("clip", "movq", "prior", "decoder", "inpaint")
# About 60 minutes on 2 CPU cores (torch 2.13; 59.4 measured): the decoder, at 0.4 s a step, takes most.
STEPS = dict(clip=4000, movq=1200, prior=3000, decoder=5000, inpaint=900)
BATCH = dict(clip=32, movq=16, prior=32, decoder=32, inpaint=16)
IMAGES = 16384  # the decoders' training set, encoded once


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
    # In this world an image's colours are its latents' channel means. Kandinsky's linear schedule leaves 4%
    # of the signal at the last step, so a model learns to read the colours off the noise's mean, which is
    # random when sampling: the cosine schedule leaves 1.2% at the first sampling step (offset noise in
    # training hides the rest), and predicting v rather than the noise makes the model state the colours
    # (at high noise v is about the clean latents; an epsilon model's colours come out of a division by ~0).
    scheduler = DDPMScheduler(**{**presets.KANDINSKY22_DECODER_SCHEDULER, "beta_schedule": "squaredcos_cap_v2",
                                 "prediction_type": "v_prediction"})
    return dict(unet=unet, scheduler=scheduler, movq=movq,
                prior_prior=prior, prior_image_encoder=vision, prior_text_encoder=text,
                prior_tokenizer=tokenizer,
                prior_scheduler=UnCLIPScheduler(**presets.KANDINSKY22_PRIOR_SCHEDULER),
                prior_image_processor=CLIPImageProcessor(size={"shortest_edge": dw.SIZE},
                                                         crop_size={"height": dw.SIZE, "width": dw.SIZE}))


# --------------------------------------------------------------------------------------------- batches

def world_batch(seed: int, step: int, size: int = 16) -> dict:
    """Batch `step` of a run: world images in [0, 255] (NCHW float), captions, and a generator for noise."""
    rng = np.random.default_rng([seed, step])
    images, captions, attributes = zip(*(dw.sample(rng) for _ in range(size)))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return dict(pixels=pixels, captions=list(captions), attributes=attributes,
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
    """Symmetric contrastive loss. Images are told apart from every caption of the world, not only from the
    batch's: a batch seldom holds two captions that differ only in the shape, and shape is what the image
    encoder would otherwise learn last. Texts are told apart from the batch's images, equal captions all
    counting as right."""
    everything = all_captions()
    ids = caption_ids(parts["prior_tokenizer"])  # what encode_text feeds the encoder, tokenized once
    text = F.normalize(parts["prior_text_encoder"](ids).text_embeds, dim=-1)
    image = F.normalize(image_embeds(parts, batch["pixels"]), dim=-1)
    index = torch.tensor([everything.index(c) for c in batch["captions"]])
    logits = scale * image @ text.T
    same = (index[:, None] == index[None]).float()
    from_text = F.cross_entropy(logits[:, index].T, same / same.sum(1, keepdim=True))
    return (F.cross_entropy(logits, index) + from_text) / 2


@functools.cache
def caption_ids(tokenizer) -> torch.Tensor:
    from .pipelines.core import tokenize

    return tokenize(tokenizer, all_captions()).input_ids


def all_captions() -> list[str]:
    return [dw.caption(dict(shape_colour=f, shape=s, background_colour=b))
            for f in dw.COLOURS for s in dw.SHAPES for b in dw.COLOURS if b != f]


def movq_loss(parts: dict, batch: dict, crop: int = dw.SIZE // 2, noise: float = 0.1) -> torch.Tensor:
    """L1 reconstruction of random crops (a quarter of the cost; the MoVQ is convolutional) through noised
    latents, unquantized: the Kandinsky 2.2 pipelines decode with force_not_quantize, so the decoder must
    read continuous latents, and the noise makes it forgive the diffusion model's small errors. A small
    penalty keeps the latents' scale from drifting; standardise_latents fixes it exactly afterwards."""
    movq, g = parts["movq"], batch["generator"]
    y, x = (int(v) for v in torch.randint(0, dw.SIZE - crop + 1, (2,), generator=g))
    pixels = batch["pixels"][:, :, y : y + crop, x : x + crop] / 127.5 - 1
    latents = movq.encode(pixels).latents
    out = movq.decode(latents + noise * torch.randn(latents.shape, generator=g), force_not_quantize=True)
    return F.l1_loss(out.sample, pixels) + 1e-3 * latents.pow(2).mean()


@torch.no_grad()
def standardise_latents(parts: dict, batch: dict):
    """Refold the MoVQ so its latents have zero mean and unit variance per channel over the data, the
    scale the decoder's noise schedule assumes; every image decodes exactly as before."""
    from .models.layers import SpatialNorm

    movq = parts["movq"]
    latents = movq.encode(batch["pixels"] / 127.5 - 1).latents
    mean, std = latents.mean((0, 2, 3)), latents.std((0, 2, 3))
    q = movq.quant_conv
    q.bias.sub_(mean).div_(std)
    q.weight.div_(std[:, None, None, None])
    movq.quantize.embedding.weight.sub_(mean).div_(std)
    # Every layer that reads the latents: W z + b = (W * std) z' + (b + W mean), with z = std z' + mean.
    readers = [movq.post_quant_conv] + [c for m in movq.decoder.modules() if isinstance(m, SpatialNorm)
                                        for c in (m.conv_y, m.conv_b)]
    for conv in readers:
        conv.bias.add_(conv.weight[:, :, 0, 0] @ mean)
        conv.weight.mul_(std[None, :, None, None])


def noised(scheduler, x0: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> tuple:
    """(x_t, t, noise) with t uniform over the training timesteps. `offset` adds a per-sample, per-channel
    constant to the noise, so the mean of x_t tells the model nothing of the image's (Guttenberg 2023)."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((*x0.shape[:2], 1, 1), generator=generator)
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


@torch.no_grad()
def guided_samples(parts: dict, seed: int, per_caption: int, chunk: int = 256) -> torch.Tensor:
    """(per_caption, captions, dim): the prior pipeline's samples, at its defaults, for every caption."""
    from .pipelines.kandinsky import KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline(**{k[6:]: parts[k] for k in parts if k.startswith("prior_")})
    prior.set_progress_bar_config(disable=True)
    captions, g = all_captions() * per_caption, torch.Generator().manual_seed(seed)
    return torch.cat([prior(captions[i : i + chunk], generator=g).image_embeds
                      for i in range(0, len(captions), chunk)]).view(per_caption, len(all_captions()), -1)


@torch.no_grad()
def encode_world(parts: dict, seed: int, n: int, per_caption: int | None = None, chunk: int = 256) -> dict:
    """n world images as the decoders train on them, encoded once (the frozen encoders are a quarter of a
    decoder step): MoVQ latents, CLIP image embeddings, attributes, and one of `per_caption` (at most 32)
    guided samples of the prior for the image's caption, what the pipelines condition the decoder on."""
    index = {c: i for i, c in enumerate(all_captions())}
    per_caption = per_caption or min(32, math.ceil(n / len(index)))
    pool, out = guided_samples(parts, seed, per_caption), dict(latents=[], embeds=[], guided=[], attributes=[])
    for i in range(math.ceil(n / chunk)):
        batch = world_batch(seed, i, min(chunk, n - i * chunk))
        out["latents"].append(parts["movq"].encode(batch["pixels"] / 127.5 - 1).latents)
        out["embeds"].append(image_embeds(parts, batch["pixels"]))
        rows = torch.randint(0, per_caption, (len(batch["captions"]),), generator=batch["generator"])
        out["guided"].append(pool[rows, [index[c] for c in batch["captions"]]])
        out["attributes"] += batch["attributes"]
        log.info("encoded %d of %d images", len(out["attributes"]), n)
    return {k: v if k == "attributes" else torch.cat(v) for k, v in out.items()}


def encoded_batch(world: Callable[[], dict], seed: int, step: int, size: int) -> dict:
    """Batch `step` drawn from the encoded images `world()`, with a generator for its noise."""
    rng = np.random.default_rng([seed, step])
    data = world()
    rows = rng.choice(len(data["attributes"]), size, replace=False)
    batch = {k: [v[i] for i in rows] if k == "attributes" else v[rows] for k, v in data.items()}
    return dict(batch, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))


def decoder_inputs(parts: dict, batch: dict, p_uncond: float = 0.1, p_guided: float = 0.5) -> tuple:
    """(MoVQ latents, conditioning) of an encoded batch. The condition is the image's own embedding or, at
    rate p_guided, the prior's guided sample for its caption: guidance pushes those off the manifold of
    image embeddings, and a decoder that never saw them draws blurred shapes. The all-zeros image's
    embedding, the pipelines' negative, stands in for "no condition" at rate p_uncond."""
    from .pipelines.kandinsky import zero_image_embeds

    g, n = batch["generator"], len(batch["attributes"])
    embeds = torch.where((torch.rand(n, generator=g) < p_guided)[:, None], batch["guided"], batch["embeds"])
    zero = zero_image_embeds(parts["prior_image_encoder"], 1)  # the pipelines' own, computed once
    drop = (torch.rand(n, generator=g) < p_uncond)[:, None]
    return batch["latents"], {"image_embeds": torch.where(drop, zero, embeds)}


def velocity_loss(parts: dict, unet, batch: dict, extra=()) -> torch.Tensor:
    """v-prediction loss (Salimans & Ho 2022) on the latent channels of the output (the rest, a learned
    variance, stays untrained: the scheduler uses fixed variances); `extra(latents)` are inpainting's inputs.
    At high noise v is nearly the clean latents, so colour and layout are learned where they are decided."""
    latents, cond = decoder_inputs(parts, batch)
    x_t, t, noise = noised(parts["scheduler"], latents, batch["generator"], offset=0.1)
    x_in = torch.cat([x_t, *extra(latents)], 1) if extra else x_t
    v = unet(x_in, t, encoder_hidden_states=None, added_cond_kwargs=cond).sample[:, : latents.shape[1]]
    a = parts["scheduler"].alphas_cumprod[t].view(-1, 1, 1, 1)
    return F.mse_loss(v, a.sqrt() * noise - (1 - a).sqrt() * latents)


def decoder_loss(parts: dict, batch: dict) -> torch.Tensor:
    return velocity_loss(parts, parts["unet"], batch)


def repaint_masks(batch: dict) -> torch.Tensor:
    """(B, 1, H, W) masks, 1 = repaint: the shape's box grown by 0-4 pixels, or a random rectangle."""
    g, masks = batch["generator"], torch.zeros(len(batch["attributes"]), 1, dw.SIZE, dw.SIZE)
    for m, a in zip(masks, batch["attributes"]):
        grow, box = torch.randint(0, 5, (1,), generator=g), torch.randint(0, dw.SIZE, (2, 2), generator=g)
        lo, hi = box.min(0).values, box.max(0).values
        if torch.rand(1, generator=g).item() < 0.5:
            lo, hi = torch.tensor([a["y"], a["x"]]) - grow, torch.tensor([a["y"], a["x"]]) + a["side"] + grow
        lo = lo.clamp(0, dw.SIZE - 8)
        hi = torch.maximum(hi, lo + 8)  # at least two latent pixels across
        m[:, lo[0] : hi[0], lo[1] : hi[1]] = 1
    return masks


def inpaint_loss(parts: dict, batch: dict) -> torch.Tensor:
    """The inpainting decoder sees the kept latents and the kept-region mask exactly as the pipeline builds
    them (with its own mask functions), and learns to fill in the rest from the image embedding."""
    from .pipelines.kandinsky import keep_mask, mask_batch

    def extra(latents):
        keep = mask_batch(repaint_masks(batch), dw.SIZE, dw.SIZE)
        keep = keep_mask(F.interpolate(keep, tuple(latents.shape[-2:]), mode="nearest"))
        return latents * keep, keep

    return velocity_loss(parts, parts["unet_inpaint"], batch, extra)


def inpaint_unet(unet) -> torch.nn.Module:
    """The inpainting decoder starts as the text-to-image one with five more input channels, zero at first
    (the masked latents and the mask), as Kandinsky's inpainting decoder was made from its text one."""
    from .models import UNet2DConditionModel

    model = UNet2DConditionModel(**{**unet.config, "in_channels": 9})
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], 5, *w.shape[2:])], 1)
    model.load_state_dict(state)
    return model


# --------------------------------------------------------------------------------------------- training

@dataclass
class Stage:
    name: str
    model: torch.nn.Module
    loss: Callable[[dict], torch.Tensor]  # batch -> loss
    batch: Callable[[int], dict]  # step -> batch
    lr: float = 1e-3
    prepare: Callable[[], None] | None = None  # before training (a checkpoint loaded after it overrides it)
    finish: Callable[[], None] | None = None  # after training, also when a finished stage is reloaded
    ema: float | None = None  # decay of the weights' moving average that the stage ends with


def stages(parts: dict, seed: int = 0, batch_size: int | dict = 16, images: int = IMAGES) -> Iterator[Stage]:
    """The stages in order, each made when reached: the inpainting decoder starts from the trained one.
    The decoders share `images` world images, encoded when first needed (a finished stage needs none)."""
    def statistics(fn):  # one fixed large batch, drawn from its own stream
        return lambda: fn(parts, world_batch(seed + 1000 * len(STAGES), 0, 256))

    world = functools.cache(lambda: encode_world(parts, seed + 1000 * (len(STAGES) + 1), images))
    losses = dict(clip=clip_loss, movq=movq_loss, prior=prior_loss, decoder=decoder_loss,
                  inpaint=inpaint_loss)
    options = dict(movq=dict(finish=statistics(standardise_latents)),
                   prior=dict(lr=3e-4, prepare=statistics(set_clip_stats), ema=0.999),
                   decoder=dict(ema=0.999), inpaint=dict(ema=0.999))
    for i, name in enumerate(STAGES):
        if name == "inpaint":
            parts["unet_inpaint"] = inpaint_unet(parts["unet"])
        models = dict(clip=torch.nn.ModuleList([parts["prior_text_encoder"], parts["prior_image_encoder"]]),
                      movq=parts["movq"], prior=parts["prior_prior"], decoder=parts["unet"],
                      inpaint=parts.get("unet_inpaint"))
        size = batch_size.get(name, 16) if isinstance(batch_size, dict) else batch_size
        batches = (functools.partial(encoded_batch, world, seed + 1000 * i, size=size)
                   if name in ("decoder", "inpaint") else functools.partial(world_batch, seed + 1000 * i, size=size))
        loss = functools.partial(losses[name], parts)
        yield Stage(name, models[name], loss, batches, **options.get(name, {}))


def train(stage: Stage, folder: Path, steps: int | None = None, minutes: float | None = None,
          resume: bool = True, save_every: float = 60.0, schedule: int | None = None) -> list[float]:
    """Train one stage until `steps` or `minutes` run out, checkpointing to folder/<name>.pt; returns the
    losses of the steps taken. A finished stage is not trained again unless `steps` asks for more. The
    learning rate decays over `schedule` steps (default: `steps`; none with only `minutes`)."""
    schedule = steps if schedule is None else schedule
    if steps is None and not minutes:
        raise ValueError("train: give steps, minutes or both")
    if stage.prepare is not None:
        stage.prepare()
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    path, step, losses, ema = Path(folder) / f"{stage.name}.pt", 0, [], [p.detach().clone() for p in params]
    if resume and path.exists():
        state = torch.load(path, weights_only=True)
        stage.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, ema = state["step"], state["ema"]
        if state["done"] and (steps is None or step >= steps):
            return finish(stage, losses)
    start = saved = logged = time.monotonic()
    deadline = start + 60 * minutes if minutes else math.inf
    stage.model.train()
    while step < (steps if steps is not None else math.inf) and time.monotonic() < deadline:
        for group in opt.param_groups:
            group["lr"] = stage.lr * learning_rate(step, schedule)
        loss = stage.loss(stage.batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if stage.ema:  # the average forgets its random start quickly: decay grows to stage.ema
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(stage.ema, step / (step + 10)))
        losses.append(loss.item())
        if time.monotonic() - logged > 10 or step == steps:
            log.info("%s step %d loss %.4f (%.0f s)", stage.name, step, losses[-1], time.monotonic() - start)
            logged = time.monotonic()
        if time.monotonic() - saved > save_every:
            save(path, stage, opt, step, ema, False)
            saved = time.monotonic()
    if stage.ema:
        torch._foreach_copy_([p.data for p in params], ema)
    save(path, stage, opt, step, ema, True)
    return finish(stage, losses)


def learning_rate(step: int, steps: int | None) -> float:
    """Linear warm-up over 100 steps (a fifth of a short run): transformers trained from scratch need it.
    Then, when the run's length is known, a cosine decay to a tenth: the last steps refine, not wander."""
    warmup = 100 if steps is None else max(1, min(100, steps // 5))
    ramp = min(1.0, (step + 1) / warmup)
    return ramp if steps is None else ramp * (0.55 + 0.45 * math.cos(math.pi * step / steps))


def finish(stage: Stage, losses: list[float]) -> list[float]:
    if stage.finish is not None:
        stage.finish()
    return losses


def save(path: Path, stage: Stage, opt, step: int, ema: list, done: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # a kill while writing leaves the previous checkpoint intact
    state = dict(model=stage.model.state_dict(), optimizer=opt.state_dict(), step=step, ema=ema, done=done)
    torch.save(state, tmp)
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


def train_all(folder, minutes_per_stage: float | dict | None = None, steps: int | dict | None = None,
              seed: int = 0, resume: bool = True, batch_size: int | dict = BATCH, width: int = 32,
              dtype: torch.dtype = torch.float32, images: int = IMAGES) -> Path:
    """Train the stages in order and export the demo cascade to `folder` (stage checkpoints go to
    folder/stages). Budgets are per stage, one number for all or {stage: number}; by default STEPS.
    `images`: how many world images the decoders train on."""
    folder, parts = Path(folder), build(seed, width)
    steps = STEPS if steps is None and minutes_per_stage is None else steps
    for stage in stages(parts, seed, batch_size, images):
        budgets = (b.get(stage.name) if isinstance(b, dict) else b for b in (steps, minutes_per_stage))
        train(stage, folder / "stages", *budgets, resume)
        freeze(stage.model)
    export(parts, folder, dtype)
    return folder


CARD = """
# The demo cascade of [cascade](https://pypi.org/project/cascade-diffusion/)

A Kandinsky 2.2 cascade at tiny width, trained from scratch by `python -m cascade.train` on the demo world
(`cascade.demo_world`): 64x64 images of one filled circle, square or triangle of one of eight colours on a
background of another, captioned "a {colour} {shape} on a {colour} background". Folders: demo (the
text-to-image decoder), demo-inpaint (the inpainting decoder) and demo-prior (prior, CLIP, tokenizer).
"""


def export(parts: dict, folder: Path, dtype: torch.dtype = torch.float32):
    """Three checkpoint folders laid out like the real ones: demo-prior, demo (the decoder; its model card
    names the prior, so combined pipelines load from it) and demo-inpaint."""
    from .pipelines.kandinsky import (KandinskyV22InpaintPipeline, KandinskyV22Pipeline,
                                      KandinskyV22PriorPipeline)

    def part(name):
        value = parts[name]
        return copy.deepcopy(value).to(dtype) if isinstance(value, torch.nn.Module) else value

    KandinskyV22PriorPipeline(**{k[6:]: part(k) for k in parts if k.startswith("prior_")}).save_pretrained(
        folder / "demo-prior")
    for name, cls, unet in (("demo", KandinskyV22Pipeline, "unet"),
                            ("demo-inpaint", KandinskyV22InpaintPipeline, "unet_inpaint")):
        cls(unet=part(unet), scheduler=parts["scheduler"], movq=part("movq")).save_pretrained(folder / name)
        (folder / name / "README.md").write_text("---\nprior:\n- demo-prior\n---\n" + CARD)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cascade.train", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--minutes", type=float, default=None, help="time budget per stage")
    parser.add_argument("--steps", type=int, default=None, help="steps per stage (default: %s)" %
                        ", ".join(f"{k} {v}" for k, v in STEPS.items()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--float16", action="store_true", help="store the weights in float16, as shipped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_all(args.out_dir, args.minutes, args.steps, args.seed, not args.no_resume,
              dtype=torch.float16 if args.float16 else torch.float32)


if __name__ == "__main__":
    main()
