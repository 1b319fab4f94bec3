"""Kandinsky 2.2: prior (text -> CLIP image embedding) -> UNet decoder -> MoVQ, and its ten pipelines."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .core import (DiffusionPipeline, ImagePipelineOutput, Output, check_output_type,
                   connected_prior, denoise, encode_image, encode_text, guided, noised_start, postprocess,
                   start_latents, sub_pipeline, to_tensor_batch)


@dataclass
class KandinskyPriorPipelineOutput(Output):
    image_embeds: Any
    negative_image_embeds: Any


_ZERO_EMBEDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def zero_image_embeds(image_encoder, batch: int) -> torch.Tensor:
    """The embedding of an all-zeros image: computed once per encoder, device and dtype, then reused
    (the reference runs the 1.8 B-parameter encoder for it on every call)."""
    p = next(image_encoder.parameters())
    per_encoder = _ZERO_EMBEDS.setdefault(image_encoder, {})
    if (p.device, p.dtype) not in per_encoder:
        size = image_encoder.config.image_size
        zeros = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
        per_encoder.clear()
        per_encoder[(p.device, p.dtype)] = image_encoder(zeros).image_embeds
    return per_encoder[(p.device, p.dtype)].repeat(batch, 1)


class KandinskyPriorBase(DiffusionPipeline):
    components_order = ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")
    demo_part = "demo-prior"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "text_encoder_hidden_states", "text_mask"]

    def prompts(self, prompt, negative_prompt):
        """The reference samples negative prompts as extra rows and returns them as the negative embeds."""
        prompt = [prompt] if isinstance(prompt, str) else prompt
        negative_prompt = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(prompt, list) or negative_prompt is not None and not isinstance(negative_prompt, list):
            raise TypeError("prompt and negative_prompt must be a str or a list of str")
        if negative_prompt is None:
            return prompt, None
        return prompt + negative_prompt, 2 * negative_prompt

    def prior_fn(self, state):
        def fn(x, t, *_):
            return self.prior(x, timestep=t, proj_embedding=state["prompt_embeds"],
                              encoder_hidden_states=state["text_encoder_hidden_states"],
                              attention_mask=state["text_mask"]).predicted_image_embedding

        return fn

    def encode_image(self, image, num_images_per_prompt):
        embeds = encode_image(self.image_processor, self.image_encoder, image)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def sample_embeds(self, prompt, negative_prompt, n, steps, generator, latents, guidance_scale,
                      on_step_end, tensor_inputs, output_type, return_dict, start=None, strength=None):
        """Shared by text-to-embedding and embedding-to-embedding: encode, sample, split, format."""
        check_output_type(output_type, ("pt", "np"))
        prompt, negative_prompt = self.prompts(prompt, negative_prompt)
        state: dict = {}
        on_step = self.callbacks(state, on_step_end, tensor_inputs)
        state.update(encode_text(self.tokenizer, self.text_encoder, prompt, negative_prompt, n,
                                 guidance_scale > 1))
        plan, first = self.scheduler.plan(steps, device=self.device), 0
        if start is None:
            shape = (len(prompt) * n, self.prior.config.embedding_dim)
            latents = start_latents(self.scheduler, plan, shape, generator, latents, state["prompt_embeds"].dtype,
                                    self.device)
        else:
            latents, first = noised_start(self.scheduler, plan, start(), strength, generator)
        model = guided(self.prior_fn(state), guidance_scale)
        latents = denoise(model, self.scheduler, plan, latents, generator, on_step, self.progress_bar, first)
        embeds = self.prior.post_process_latents(latents)
        if negative_prompt is None:
            negative = zero_image_embeds(self.image_encoder, embeds.shape[0])
        else:
            embeds, negative = embeds.chunk(2)
        if output_type == "np":
            embeds, negative = embeds.cpu().float().numpy(), negative.cpu().float().numpy()
        return KandinskyPriorPipelineOutput(embeds, negative) if return_dict else (embeds, negative)

    @torch.no_grad()
    def interpolate(self, images_and_prompts, weights, num_images_per_prompt=1, num_inference_steps=25,
                    generator=None, latents=None, negative_prior_prompt=None, negative_prompt="",
                    guidance_scale=4.0, device=None):
        """Mix prompts and images into one embedding: the weighted sum of their embeddings."""
        if len(images_and_prompts) != len(weights):
            raise ValueError(f"images_and_prompts has {len(images_and_prompts)} items, weights {len(weights)}")
        run = dict(num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
                   generator=generator, latents=latents, negative_prompt=negative_prior_prompt,
                   guidance_scale=guidance_scale)
        total = 0
        for cond, weight in zip(images_and_prompts, weights):
            if isinstance(cond, str):
                embeds = KandinskyV22PriorPipeline.__call__(self, cond, **run).image_embeds
            else:
                embeds = self.encode_image(cond if isinstance(cond, torch.Tensor) else [cond], 1)
                embeds = embeds.repeat(num_images_per_prompt, 1)
            total = total + embeds * weight
        out = KandinskyV22PriorPipeline.__call__(self, negative_prompt, **run)
        negative = out.negative_image_embeds if negative_prompt == "" else out.image_embeds
        return KandinskyPriorPipelineOutput(image_embeds=total, negative_image_embeds=negative)


class KandinskyV22PriorPipeline(KandinskyPriorBase):
    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, num_images_per_prompt=1, num_inference_steps=25,
                 generator=None, latents=None, guidance_scale=4.0, output_type="pt", return_dict=True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Text -> CLIP image embeddings (`image_embeds`) and the negative ones the decoder guides against."""
        return self.sample_embeds(prompt, negative_prompt, num_images_per_prompt, num_inference_steps,
                                  generator, latents, guidance_scale, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, output_type, return_dict)


class KandinskyV22PriorEmb2EmbPipeline(KandinskyPriorBase):
    @torch.no_grad()
    def __call__(self, prompt, image, strength=0.3, negative_prompt=None, num_images_per_prompt=1,
                 num_inference_steps=25, generator=None, guidance_scale=4.0, output_type="pt", return_dict=True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Like the prior, starting from the embedding of `image` (images or embeddings) noised to `strength`."""
        rows = len(self.prompts(prompt, negative_prompt)[0]) * num_images_per_prompt
        start = lambda: self.start_embeds(image, num_images_per_prompt, rows)  # noqa: E731 (after input checks)
        return self.sample_embeds(prompt, negative_prompt, num_images_per_prompt, num_inference_steps,
                                  generator, None, guidance_scale, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, output_type, return_dict, start=start,
                                  strength=strength)

    def start_embeds(self, image, n, rows):
        images = image if isinstance(image, list) else [image]
        if isinstance(images[0], torch.Tensor):
            images = torch.cat(images)
            if images.ndim not in (2, 4):
                raise ValueError(f"image: tensors must be embeddings (B, D) or images (B, 3, H, W), got {images.shape}")
        embeds = images.repeat_interleave(n, 0) if getattr(images, "ndim", 0) == 2 else self.encode_image(images, n)
        if rows % embeds.shape[0]:
            raise ValueError(f"image: {embeds.shape[0]} embeddings cannot be spread over {rows} prompts")
        return torch.cat([embeds] * (rows // embeds.shape[0])).to(self.device, self.prior.dtype)


# --------------------------------------------------------------------------------------------- decoders

class KandinskyDecoderBase(DiffusionPipeline):
    """What the five decoders share: embeddings for guidance, the UNet as a model function, MoVQ decoding."""

    components_order = ("unet", "scheduler", "movq")
    demo_part = "demo"
    _callback_tensor_inputs = ["latents", "image_embeds", "negative_image_embeds"]
    unit_pt = False  # the reference returns "pt" images in [-1, 1] here, in [0, 1] from img2img

    @property
    def movq_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    def embeds_for_guidance(self, image_embeds, negative_image_embeds, n, guidance_scale) -> dict:
        """Per-sample embeddings, batched [negative, positive] when guiding; the state callbacks may edit."""
        image_embeds, negative = (torch.cat(e) if isinstance(e, list) else e
                                  for e in (image_embeds, negative_image_embeds))
        if guidance_scale > 1 and negative.shape[0] != image_embeds.shape[0]:
            raise ValueError(f"negative_image_embeds: batch {negative.shape[0]} does not match image_embeds "
                             f"batch {image_embeds.shape[0]}")
        # Expanded in both paths: the reference expands only when guiding and fails otherwise.
        image_embeds, negative = image_embeds.repeat_interleave(n, 0), negative.repeat_interleave(n, 0)
        if guidance_scale > 1:
            image_embeds = torch.cat([negative, image_embeds])
        dtype = self.unet.dtype
        return {"image_embeds": image_embeds.to(self.device, dtype), "negative_image_embeds": negative,
                "batch": negative.shape[0], "guidance_scale": guidance_scale}

    def per_sample(self, name, x, state, n):
        """Conditioning images: one per embedding (or one for all), repeated per image, doubled to guide."""
        batch = state["batch"] // n
        if x.shape[0] not in (1, batch):
            raise ValueError(f"{name}: got a batch of {x.shape[0]}, expected 1 or {batch} (one per image embedding)")
        x = x.expand(batch, *x.shape[1:]).repeat_interleave(n, 0) if x.shape[0] == 1 else x.repeat_interleave(n, 0)
        return torch.cat([x, x]) if state["guidance_scale"] > 1 else x

    def latent_shape(self, state, height, width):
        f = self.movq_scale_factor
        if height % f**2 or width % f**2:
            raise ValueError(f"height and width must be multiples of {f**2}, got {height}x{width}")
        return (state["batch"], self.movq.config.latent_channels, height // f, width // f)

    def unet_fn(self, state, extra=()):
        """The UNet as model(x, t); `extra` names state tensors concatenated to its input channels."""
        learned = getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")

        def fn(x, t, *_):
            x_in = torch.cat([x, *(state[k] for k in extra)], dim=1) if extra else x
            cond = {"image_embeds": state["image_embeds"],
                    **({"hint": state["hint"]} if "hint" in state else {})}
            return self.unet(x_in, t, encoder_hidden_states=None, added_cond_kwargs=cond, return_dict=False)[0]

        model = guided(fn, state["guidance_scale"], learned_variance=True)
        return model if learned else (lambda x, *at: model(x, *at)[:, : x.shape[1]])

    def encode_images(self, image, height, width):
        x = to_tensor_batch(image, height, width).to(self.device, self.movq.dtype)
        return self.movq.encode(x).latents

    def sample(self, state, latents, plan, first, generator, on_step_end, tensor_inputs, legacy, before=None,
               extra=()):
        on_step = self.callbacks(state, on_step_end, tensor_inputs, legacy, before)
        return denoise(self.unet_fn(state, extra), self.scheduler, plan, latents, generator, on_step,
                       self.progress_bar, first)

    def decode(self, latents, output_type, return_dict):
        if output_type != "latent":
            latents = postprocess(self.movq.decode(latents, force_not_quantize=True).sample, output_type,
                                  self.unit_pt)
        return ImagePipelineOutput(images=latents) if return_dict else (latents,)

    def text2img(self, state, height, width, steps, generator, latents, legacy, on_step_end, tensor_inputs,
                 output_type, return_dict):
        check_output_type(output_type)
        shape = self.latent_shape(state, height, width)
        plan = self.scheduler.plan(steps, device=self.device)
        latents = start_latents(self.scheduler, plan, shape, generator, latents, state["image_embeds"].dtype,
                                self.device)
        latents = self.sample(state, latents, plan, 0, generator, on_step_end, tensor_inputs, legacy)
        return self.decode(latents, output_type, return_dict)

    def img2img(self, state, image, height, width, steps, strength, n, generator, legacy, on_step_end,
                tensor_inputs, output_type, return_dict):
        check_output_type(output_type)
        self.latent_shape(state, height, width)
        image = self.per_sample("image", self.encode_images(image, height, width),
                                {**state, "guidance_scale": 1}, n)
        plan = self.scheduler.plan(steps, device=self.device)
        latents, first = noised_start(self.scheduler, plan, image, strength, generator)
        latents = self.sample(state, latents, plan, first, generator, on_step_end, tensor_inputs, legacy)
        return self.decode(latents, output_type, return_dict)


class KandinskyV22Pipeline(KandinskyDecoderBase):
    @torch.no_grad()
    def __call__(self, image_embeds, negative_image_embeds, height=512, width=512, num_inference_steps=100,
                 guidance_scale=4.0, num_images_per_prompt=1, generator=None, latents=None, output_type="pil",
                 return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 **kwargs):
        """CLIP image embeddings (from the prior) -> images."""
        state = self.embeds_for_guidance(image_embeds, negative_image_embeds, num_images_per_prompt,
                                         guidance_scale)
        return self.text2img(state, height, width, num_inference_steps, generator, latents, kwargs,
                             callback_on_step_end, callback_on_step_end_tensor_inputs, output_type,
                             return_dict)


class KandinskyV22ControlnetPipeline(KandinskyDecoderBase):
    @torch.no_grad()
    def __call__(self, image_embeds, negative_image_embeds, hint, height=512, width=512,
                 num_inference_steps=100, guidance_scale=4.0, num_images_per_prompt=1, generator=None,
                 latents=None, output_type="pil", callback=None, callback_steps=1, return_dict=True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """As the text-to-image decoder, steered by `hint` (e.g. a depth map, (B, 3, H, W) in [0, 1])."""
        state = self.embeds_for_guidance(image_embeds, negative_image_embeds, num_images_per_prompt,
                                         guidance_scale)
        hint = torch.cat(hint) if isinstance(hint, list) else hint
        state["hint"] = self.per_sample("hint", hint, state, num_images_per_prompt).to(self.device, self.unet.dtype)
        legacy = {"callback": callback, "callback_steps": callback_steps}
        return self.text2img(state, height, width, num_inference_steps, generator, latents, legacy,
                             callback_on_step_end, callback_on_step_end_tensor_inputs, output_type,
                             return_dict)


class KandinskyV22Img2ImgPipeline(KandinskyDecoderBase):
    unit_pt = True

    @torch.no_grad()
    def __call__(self, image_embeds, image, negative_image_embeds, height=512, width=512,
                 num_inference_steps=100, guidance_scale=4.0, strength=0.3, num_images_per_prompt=1,
                 generator=None, output_type="pil", return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **kwargs):
        """Images -> images guided by embeddings; `strength` is how much of the schedule is re-run."""
        state = self.embeds_for_guidance(image_embeds, negative_image_embeds, num_images_per_prompt,
                                         guidance_scale)
        return self.img2img(state, image, height, width, num_inference_steps, strength, num_images_per_prompt,
                            generator, kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                            output_type, return_dict)


class KandinskyV22ControlnetImg2ImgPipeline(KandinskyDecoderBase):
    unit_pt = True

    @torch.no_grad()
    def __call__(self, image_embeds, image, negative_image_embeds, hint, height=512, width=512,
                 num_inference_steps=100, guidance_scale=4.0, strength=0.3, num_images_per_prompt=1,
                 generator=None, output_type="pil", callback=None, callback_steps=1, return_dict=True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Image-to-image steered by `hint`."""
        state = self.embeds_for_guidance(image_embeds, negative_image_embeds, num_images_per_prompt,
                                         guidance_scale)
        hint = torch.cat(hint) if isinstance(hint, list) else hint
        state["hint"] = self.per_sample("hint", hint, state, num_images_per_prompt).to(self.device, self.unet.dtype)
        legacy = {"callback": callback, "callback_steps": callback_steps}
        return self.img2img(state, image, height, width, num_inference_steps, strength, num_images_per_prompt,
                            generator, legacy, callback_on_step_end, callback_on_step_end_tensor_inputs,
                            output_type, return_dict)


def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """Shrink the kept region (1) next to repainted pixels (0) over the six neighbours the reference uses:
    up, left, up-left, down, right, down-right."""
    padded = F.pad(mask, (1, 1, 1, 1), value=1.0)
    h, w = mask.shape[-2:]
    out = mask
    for di, dj in ((1, 0), (0, 1), (1, 1), (-1, 0), (0, -1), (-1, -1)):
        out = out * padded[..., 1 + di: 1 + di + h, 1 + dj: 1 + dj + w]
    return out


def batched_mask(m: torch.Tensor) -> torch.Tensor:
    """A mask tensor as (B, 1, H, W): (H, W) is one mask, (1, H, W) one with its channel, (B, H, W) a batch."""
    m = m[None, None] if m.ndim == 2 else m[:, None] if m.ndim == 3 and m.shape[0] != 1 else m
    return m[None] if m.ndim == 3 else m


def mask_batch(mask_image, height, width) -> torch.Tensor:
    """PIL / numpy / tensor masks (1 = repaint) -> (B, 1, H, W) binary masks of the pixels to keep."""
    if isinstance(mask_image, torch.Tensor):
        m = batched_mask(mask_image.float())
        if m.min() < 0 or m.max() > 1:
            raise ValueError("mask_image: tensor values must be in [0, 1]")
    else:
        masks = mask_image if isinstance(mask_image, list) else [mask_image]
        if isinstance(masks[0], PIL.Image.Image):
            masks = [np.asarray(m.resize((width, height), resample=PIL.Image.LANCZOS).convert("L"), np.float32) / 255
                     for m in masks]
        m = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in masks])
        m = m[:, None] if m.ndim == 3 else m
    return 1 - (m >= 0.5).float()


class KandinskyV22InpaintPipeline(KandinskyDecoderBase):
    demo_part = "demo-inpaint"
    _callback_tensor_inputs = ["latents", "image_embeds", "negative_image_embeds", "masked_image",
                               "mask_image"]

    @torch.no_grad()
    def __call__(self, image_embeds, image, mask_image, negative_image_embeds, height=512, width=512,
                 num_inference_steps=100, guidance_scale=4.0, num_images_per_prompt=1, generator=None,
                 latents=None, output_type="pil", return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **kwargs):
        """Repaint the white (1) pixels of `mask_image` in `image`; each sample keeps its own image and mask."""
        state = self.embeds_for_guidance(image_embeds, negative_image_embeds, num_images_per_prompt,
                                         guidance_scale)
        check_output_type(output_type)
        shape = self.latent_shape(state, height, width)
        plan = self.scheduler.plan(num_inference_steps, device=self.device)
        before = self.prepare_inpaint(state, image, mask_image, height, width, plan, num_images_per_prompt)
        latents = start_latents(self.scheduler, plan, shape, generator, latents, state["image_embeds"].dtype,
                                self.device)
        state["noise"] = latents.clone()
        latents = self.sample(state, latents, plan, 0, generator, callback_on_step_end,
                              callback_on_step_end_tensor_inputs, kwargs, before,
                              ("masked_image", "mask_image"))
        return self.decode(before(-1, None, latents), output_type, return_dict)

    def prepare_inpaint(self, state, image, mask_image, height, width, plan, n):
        """Masked latents for the UNet's extra channels, and the per-step blend of the known region."""
        if isinstance(image, torch.Tensor) and (image.min() < -1 or image.max() > 1):
            raise ValueError("image: tensor values must be in [-1, 1]")
        x = to_tensor_batch(image, height, width, bytes_scale=True) if not isinstance(image, torch.Tensor) else image.float()
        x = self.movq.encode((x[None] if x.ndim == 3 else x).to(self.device, self.movq.dtype)).latents
        mask = mask_batch(mask_image, height, width).to(self.device, x.dtype)
        if mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"mask_image: got a batch of {mask.shape[0]}, image has {x.shape[0]}")
        mask = keep_mask(F.interpolate(mask, tuple(x.shape[-2:]), mode="nearest"))
        state["masked_image"] = self.per_sample("image", x * mask, state, n)
        state["mask_image"] = self.per_sample("mask_image", mask, state, n)
        known = x if x.shape[0] == 1 else self.per_sample("image", x, {**state, "guidance_scale": 1}, n)
        # Keep the encoder's (channels-last, for PIL input) layout: it reaches the decoder through the blend,
        # and convolutions round differently on the two layouts (1e-3 on these images).
        if x.is_contiguous(memory_format=torch.channels_last):
            known = known.contiguous(memory_format=torch.channels_last)

        def blend(i, t, latents):
            keep = state["mask_image"][: state["batch"]]
            target = known
            if 0 <= i < len(plan) - 1:  # the known region, noised to where the next evaluation is
                target = self.scheduler.noise_to(plan, known, state["noise"], i + 1)
            return keep * target + (1 - keep) * latents

        return blend


# --------------------------------------------------------------------------------------------- combined

class KandinskyCombinedBase(DiffusionPipeline):
    """Prior and decoder in one object: components of the prior carry a `prior_` prefix."""

    decoder_class: type[KandinskyDecoderBase]
    demo_part = "demo"
    components_order = ("unet", "scheduler", "movq", "prior_prior", "prior_image_encoder",
                        "prior_text_encoder", "prior_tokenizer", "prior_scheduler", "prior_image_processor")
    _callback_tensor_inputs = KandinskyDecoderBase._callback_tensor_inputs

    @property
    def prior_pipe(self) -> KandinskyV22PriorPipeline:
        return sub_pipeline(self, KandinskyV22PriorPipeline, "prior_")

    @property
    def decoder_pipe(self) -> KandinskyDecoderBase:
        return sub_pipeline(self, self.decoder_class)

    @classmethod
    def missing_parts(cls, folder, index, given, torch_dtype, variant, hub):
        return connected_prior(cls, KandinskyV22PriorPipeline, folder, index, given, torch_dtype, variant, hub)

    def prior_embeds(self, prompt, negative_prompt, n, generator, latents, guidance_scale, steps, on_step_end,
                     tensor_inputs) -> dict:
        """The decoder's `image_embeds` and `negative_image_embeds`: the prior run with its own arguments."""
        embeds, negative = self.prior_pipe(
            prompt, negative_prompt=negative_prompt, num_images_per_prompt=n, num_inference_steps=steps,
            generator=generator, latents=latents, guidance_scale=guidance_scale, output_type="pt",
            return_dict=False, callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs)
        return dict(image_embeds=embeds, negative_image_embeds=negative)

    def decoder_inputs(self, embeds: dict, **images) -> dict:
        """The embeddings and each given image spread so every embedding gets its own image."""
        if isinstance(images.get("mask_image"), torch.Tensor):  # else spread reads (B, H, W) as one mask
            images["mask_image"] = batched_mask(images["mask_image"])
        rows = embeds["image_embeds"].shape[0]
        return {**embeds, **{k: spread(v, rows) for k, v in images.items()}}


def spread(images, batch: int):
    """Repeat each image of a list (or tensor batch) so every image embedding gets its own."""
    if isinstance(images, torch.Tensor):
        images = images if images.ndim == 4 else images[None]
        return images.repeat_interleave(batch // images.shape[0], 0) if batch % images.shape[0] == 0 else images
    images = images if isinstance(images, list) else [images]
    return [i for i in images for _ in range(batch // len(images))] if batch % len(images) == 0 else images


class KandinskyV22CombinedPipeline(KandinskyCombinedBase):
    decoder_class = KandinskyV22Pipeline

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, num_inference_steps=100, guidance_scale=4.0,
                 num_images_per_prompt=1, height=512, width=512, prior_guidance_scale=4.0,
                 prior_num_inference_steps=25, generator=None, latents=None, output_type="pil", callback=None,
                 callback_steps=1, return_dict=True, prior_callback_on_step_end=None,
                 prior_callback_on_step_end_tensor_inputs=("latents",), callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Text -> images: the prior's embeddings fed to the decoder. `latents` are the prior's."""
        embeds = self.prior_embeds(prompt, negative_prompt, num_images_per_prompt, generator, latents,
                                   prior_guidance_scale, prior_num_inference_steps,
                                   prior_callback_on_step_end, prior_callback_on_step_end_tensor_inputs)
        return self.decoder_pipe(**embeds, height=height, width=width, guidance_scale=guidance_scale,
                                 num_inference_steps=num_inference_steps, generator=generator,
                                 output_type=output_type, callback=callback, callback_steps=callback_steps,
                                 return_dict=return_dict,
                                 callback_on_step_end=callback_on_step_end,
                                 callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)


class KandinskyV22Img2ImgCombinedPipeline(KandinskyCombinedBase):
    decoder_class = KandinskyV22Img2ImgPipeline

    @torch.no_grad()
    def __call__(self, prompt, image, negative_prompt=None, num_inference_steps=100, guidance_scale=4.0,
                 strength=0.3, num_images_per_prompt=1, height=512, width=512, prior_guidance_scale=4.0,
                 prior_num_inference_steps=25, generator=None, latents=None, output_type="pil", callback=None,
                 callback_steps=1, return_dict=True, prior_callback_on_step_end=None,
                 prior_callback_on_step_end_tensor_inputs=("latents",), callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Text + image -> images."""
        embeds = self.prior_embeds(prompt, negative_prompt, num_images_per_prompt, generator, latents,
                                   prior_guidance_scale, prior_num_inference_steps,
                                   prior_callback_on_step_end, prior_callback_on_step_end_tensor_inputs)
        return self.decoder_pipe(**self.decoder_inputs(embeds, image=image), strength=strength,
                                 height=height, width=width, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, generator=generator, output_type=output_type,
                                 callback=callback, callback_steps=callback_steps, return_dict=return_dict,
                                 callback_on_step_end=callback_on_step_end,
                                 callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)


class KandinskyV22InpaintCombinedPipeline(KandinskyCombinedBase):
    demo_part = "demo-inpaint"
    decoder_class = KandinskyV22InpaintPipeline
    _callback_tensor_inputs = KandinskyV22InpaintPipeline._callback_tensor_inputs

    @torch.no_grad()
    def __call__(self, prompt, image, mask_image, negative_prompt=None, num_inference_steps=100,
                 guidance_scale=4.0, num_images_per_prompt=1, height=512, width=512, prior_guidance_scale=4.0,
                 prior_num_inference_steps=25, generator=None, latents=None, output_type="pil",
                 return_dict=True, prior_callback_on_step_end=None,
                 prior_callback_on_step_end_tensor_inputs=("latents",), callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **kwargs):
        """Text + image + mask -> inpainted images; `kwargs`: the deprecated `callback`, `callback_steps`."""
        embeds = self.prior_embeds(prompt, negative_prompt, num_images_per_prompt, generator, latents,
                                   prior_guidance_scale, prior_num_inference_steps,
                                   prior_callback_on_step_end, prior_callback_on_step_end_tensor_inputs)
        images = self.decoder_inputs(embeds, image=image, mask_image=mask_image)
        return self.decoder_pipe(**images, height=height, width=width, guidance_scale=guidance_scale,
                                 num_inference_steps=num_inference_steps, generator=generator,
                                 output_type=output_type, return_dict=return_dict,
                                 callback_on_step_end=callback_on_step_end,
                                 callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                                 **kwargs)
