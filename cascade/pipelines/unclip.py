"""unCLIP (Karlo): prior (text -> CLIP image embedding) -> decoder (64 px) -> two super-resolution UNets
(256 px), and the image-variation pipeline that starts from an image's embedding instead of the prior."""
from __future__ import annotations

import contextvars

import PIL.Image
import torch
import torch.nn.functional as F

from .checks import finite_stage
from .core import (DiffusionPipeline, ImagePipelineOutput, check_output_type, denoise, encode_image,
                   encode_text, guided, postprocess, start_latents)

# The stage a call is in, per thread (contextvars): the pipeline object itself keeps no per-call state.
_STAGE: contextvars.ContextVar = contextvars.ContextVar("unclip_stage", default=None)


def conditioned(model, cond: dict):
    """model(x, t, **cond) as model(x, t). Conditioning rows beyond x's batch are the unconditional half,
    there when another stage guides (the text is encoded once for all stages): this stage takes the
    conditional half."""

    def fn(x, t, *_):
        return model(x, t, **{k: v[-x.shape[0]:] for k, v in cond.items()}, return_dict=False)[0]

    return fn


class UnCLIPBase(DiffusionPipeline):
    """What both pipelines share: the text projection, the decoder and super-resolution stages, the output.

    `callback_on_step_end(pipe, i, t, kwargs)` is called after every step of every stage; `pipe.stage` says
    which ("prior", "decoder", "super_res") and `kwargs["latents"]` are that stage's latents."""

    @property
    def stage(self) -> str | None:
        return _STAGE.get()

    def latent_shapes(self, batch: int) -> dict[str, tuple]:
        d, s = self.decoder.config, self.super_res_first.config
        shapes = {"decoder_latents": (batch, d.in_channels, d.sample_size, d.sample_size),
                  "super_res_latents": (batch, s.in_channels // 2, s.sample_size, s.sample_size)}
        if getattr(self, "prior", None) is not None:
            shapes["prior_latents"] = (batch, self.prior.config.embedding_dim)
        return shapes

    def check_inputs(self, batch: int, output_type: str, callback: tuple, **latents) -> dict[str, tuple]:
        """Everything that can be wrong with the call, before any model runs; returns the latent shapes."""
        check_output_type(output_type)
        self.callbacks({}, *callback)
        shapes = self.latent_shapes(batch)
        for name, x in latents.items():
            if x is not None and tuple(x.shape) != shapes[name]:
                raise ValueError(f"{name}: expected shape {shapes[name]}, got {tuple(x.shape)}")
        return shapes

    def denoise_stage(self, name: str, model, scheduler, plan, latents, generator, callback: tuple):
        _STAGE.set(name)
        return denoise(model, scheduler, plan, latents, generator, self.callbacks({}, *callback), self.progress_bar)

    def decoder_stage(self, text: dict, embeds, guide: bool, steps, scale, generator, latents, shape,
                      callback):
        """CLIP image embeddings (+ text) -> 64 px images in [-1, 1]."""
        prompt_embeds = text["prompt_embeds"]
        context, time_embeds = self.text_proj(
            image_embeddings=embeds.to(self.device, prompt_embeds.dtype), prompt_embeds=prompt_embeds,
            text_encoder_hidden_states=text["text_encoder_hidden_states"], do_classifier_free_guidance=guide)
        # The image's extra context tokens come first and are never masked.
        mask = F.pad(text["text_mask"], (self.text_proj.config.clip_extra_context_tokens, 0), value=True)
        cond = {"encoder_hidden_states": context, "class_labels": time_embeds, "attention_mask": mask}
        scheduler = self.decoder_scheduler
        plan = scheduler.plan(steps, device=self.device)
        latents = start_latents(scheduler, plan, shape, generator, latents, context.dtype, self.device)
        model = guided(conditioned(self.decoder, cond), scale, learned_variance=True)
        latents = self.denoise_stage("decoder", model, scheduler, plan, latents, generator, callback)
        return latents.clamp(-1, 1)

    def super_res_stage(self, image, steps, generator, latents, shape, callback):
        """64 px -> 256 px: denoise with the upscaled image as extra input channels."""
        scheduler = self.super_res_scheduler
        plan = scheduler.plan(steps, device=self.device)
        latents = start_latents(scheduler, plan, shape, generator, latents, image.dtype, self.device)
        # The CPU has no half-precision antialiased bicubic (the reference fails there): compute it in float32.
        low = image.float() if image.device.type == "cpu" else image
        upscaled = F.interpolate(low, size=shape[-2:], mode="bicubic", align_corners=False,
                                 antialias=True).to(image.dtype)
        last = plan.timesteps[-1]

        def fn(x, t, *_):  # super_res_first on every step but the last
            unet = self.super_res_last if t == last else self.super_res_first
            return unet(torch.cat([x, upscaled], dim=1), t, return_dict=False)[0]

        return self.denoise_stage("super_res", fn, scheduler, plan, latents, generator, callback)

    def decode(self, text: dict, embeds, guide: bool, shapes: dict, callback: tuple, generator, steps: tuple,
               scale, latents: tuple, output_type, return_dict):
        """Decoder, super-resolution, output; `steps` and `latents` are the (decoder, super_res) ones."""
        image = self.decoder_stage(text, embeds, guide, steps[0], scale, generator, latents[0],
                                   shapes["decoder_latents"], callback)
        image = self.super_res_stage(image, steps[1], generator, latents[1], shapes["super_res_latents"],
                                     callback)
        _STAGE.set(None)
        image = image if output_type == "latent" else postprocess(image, output_type)
        return ImagePipelineOutput(images=image) if return_dict else (image,)


class UnCLIPPipeline(UnCLIPBase):
    components_order = ("prior", "decoder", "text_encoder", "tokenizer", "text_proj", "super_res_first",
                        "super_res_last", "prior_scheduler", "decoder_scheduler", "super_res_scheduler")

    @torch.no_grad()
    def __call__(self, prompt=None, num_images_per_prompt=1, prior_num_inference_steps=25,
                 decoder_num_inference_steps=25, super_res_num_inference_steps=7, generator=None,
                 prior_latents=None, decoder_latents=None, super_res_latents=None, text_model_output=None,
                 text_attention_mask=None, prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
                 output_type="pil", return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Text -> 256 px images.

        prompt: a str or list of str, or None with `text_model_output` (a CLIP text output or a tuple
        (text_embeds, last_hidden_state)) and its `text_attention_mask` (B, L), e.g. for interpolations.
        prior_latents (B, D), decoder_latents (B, 3, 64, 64), super_res_latents (B, 3, 256, 256): the starting
        noise of each stage, B = prompts x num_images_per_prompt. Guidance is on when a scale is > 1.
        output_type: "pil", "np" (B, H, W, 3) or "pt" (B, 3, H, W) in [0, 1]; "latent": (B, 3, H, W) in
        [-1, 1], the last stage's output as it is."""
        n, callback = num_images_per_prompt, (callback_on_step_end, callback_on_step_end_tensor_inputs)
        batch = self.prompt_batch(prompt, text_model_output, text_attention_mask) * n
        shapes = self.check_inputs(batch, output_type, callback, prior_latents=prior_latents,
                                   decoder_latents=decoder_latents, super_res_latents=super_res_latents)
        guide = prior_guidance_scale > 1 or decoder_guidance_scale > 1
        text = self.encode_prompt(prompt, text_model_output, text_attention_mask, n, guide)
        embeds = self.prior_stage(text, prior_num_inference_steps, prior_guidance_scale, generator,
                                  prior_latents, shapes["prior_latents"], callback)
        finite_stage("prior", embeds)
        steps = (decoder_num_inference_steps, super_res_num_inference_steps)
        return self.decode(text, embeds, guide, shapes, callback, generator, steps, decoder_guidance_scale,
                           (decoder_latents, super_res_latents), output_type, return_dict)

    @staticmethod
    def prompt_batch(prompt, text_model_output, text_attention_mask) -> int:
        if prompt is None and text_model_output is None:
            raise ValueError("pass a prompt, or text_model_output with text_attention_mask")
        if prompt is not None and text_model_output is not None:
            raise ValueError("pass either prompt or text_model_output, not both")
        if text_model_output is not None:
            if text_attention_mask is None:
                raise ValueError("text_model_output needs its text_attention_mask (the tokenizer's "
                                 "attention_mask)")
            return text_model_output[0].shape[0]
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return len(prompt)
        raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.40}")

    def encode_prompt(self, prompt, text_model_output, text_attention_mask, n: int, guide: bool) -> dict:
        """CLIP text embeddings, hidden states and mask, [unconditional "", conditional] when guiding."""
        if text_model_output is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            return encode_text(self.tokenizer, self.text_encoder, prompt, None, n, guide)
        given = [text_model_output[0], text_model_output[1], text_attention_mask.bool()]
        given = [v.to(self.device).repeat_interleave(n, 0) for v in given]
        if guide:
            rows = text_model_output[0].shape[0]
            empty = encode_text(self.tokenizer, self.text_encoder, [""] * rows, None, n, False)
            given = [torch.cat([neg, pos]) for neg, pos in zip(empty.values(), given)]
        return dict(zip(("prompt_embeds", "text_encoder_hidden_states", "text_mask"), given))

    def prior_stage(self, text: dict, steps, scale, generator, latents, shape, callback):
        """Text -> CLIP image embeddings."""
        plan = self.prior_scheduler.plan(steps, device=self.device)
        latents = start_latents(self.prior_scheduler, plan, shape, generator, latents, text["prompt_embeds"].dtype,
                                self.device)
        cond = {"proj_embedding": text["prompt_embeds"], "attention_mask": text["text_mask"],
                "encoder_hidden_states": text["text_encoder_hidden_states"]}
        model = guided(conditioned(self.prior, cond), scale)
        latents = self.denoise_stage("prior", model, self.prior_scheduler, plan, latents, generator, callback)
        return self.prior.post_process_latents(latents)


class UnCLIPImageVariationPipeline(UnCLIPBase):
    components_order = ("decoder", "text_encoder", "tokenizer", "text_proj", "feature_extractor",
                        "image_encoder", "super_res_first", "super_res_last", "decoder_scheduler",
                        "super_res_scheduler")

    @torch.no_grad()
    def __call__(self, image=None, num_images_per_prompt=1, decoder_num_inference_steps=25,
                 super_res_num_inference_steps=7, generator=None, decoder_latents=None,
                 super_res_latents=None, image_embeddings=None, decoder_guidance_scale=8.0, output_type="pil",
                 return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Images -> variations of them, as UnCLIPPipeline's decoder and super-resolution stages.

        image: a PIL image, a list of them, or a tensor (B, 3, H, W) the feature extractor already prepared;
        or None with `image_embeddings` (B, D), e.g. for interpolations. The decoder's text is empty."""
        n, callback = num_images_per_prompt, (callback_on_step_end, callback_on_step_end_tensor_inputs)
        rows = self.image_batch(image, image_embeddings)
        shapes = self.check_inputs(rows * n, output_type, callback, decoder_latents=decoder_latents,
                                   super_res_latents=super_res_latents)
        guide = decoder_guidance_scale > 1
        text = encode_text(self.tokenizer, self.text_encoder, [""] * rows, None, n, guide)
        embeds = self.encode_image(image, image_embeddings).repeat_interleave(n, 0)
        steps = (decoder_num_inference_steps, super_res_num_inference_steps)
        return self.decode(text, embeds, guide, shapes, callback, generator, steps, decoder_guidance_scale,
                           (decoder_latents, super_res_latents), output_type, return_dict)

    @staticmethod
    def image_batch(image, image_embeddings) -> int:
        if (image is None) == (image_embeddings is None):
            raise ValueError("pass either an image or image_embeddings")
        if image is None:
            return image_embeddings.shape[0]
        if isinstance(image, PIL.Image.Image):
            return 1
        if isinstance(image, list) and image and all(isinstance(i, PIL.Image.Image) for i in image):
            return len(image)
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            return image.shape[0]
        raise TypeError(f"image must be a PIL image, a list of them or a (B, 3, H, W) tensor, got "
                        f"{type(image).__name__}{tuple(image.shape) if hasattr(image, 'shape') else ''}")

    def encode_image(self, image, image_embeddings):
        if image_embeddings is not None:
            return image_embeddings.to(self.device)
        return encode_image(self.feature_extractor, self.image_encoder, image)
