"""Every sampler in every pipeline: against the reference's pipelines where they are right, against the
reference's components in the standard diffusion loop where they are not (TESTING.md), per-call state."""
import threading

import numpy as np
import pytest
import torch
from conftest import assert_close, load

import cascade
from cascade.schedulers import SAMPLERS, samplers_for, scheduler_for

diffusers = pytest.importorskip("diffusers")

GENERAL = [n for n in SAMPLERS if n not in ("unclip", "wuerstchen")]
# Where the reference's own Kandinsky decoder is right: it never scales inputs and passes `generator`.
REFERENCE_PIPELINE_RIGHT = ("ddpm", "ddim", "dpm++2m", "dpm++2m-karras", "dpm++sde")


def reference_scheduler(name, config):
    class_name, overrides = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config({**dict(config), **overrides})


def embeds(batch=1, seed=0, dim=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


@pytest.fixture(scope="module")
def decoder(kandinsky_root):
    folder = kandinsky_root / "text2img"
    return load(cascade, "KandinskyV22Pipeline", folder), load(diffusers, "KandinskyV22Pipeline", folder)


def standard_loop(ref, scheduler, image_embeds, negative, steps, seed, guidance=4.0, size=64):
    """The reference's components in the loop every sampler expects: scale_model_input, UNet, guidance on
    the predicted channels, step (with a generator where the sampler draws noise)."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(ref.movq.config.block_out_channels) - 1)
    shape = (1, ref.unet.config.in_channels, size // f, size // f)
    latents = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    cond = torch.cat([negative, image_embeds])
    takes_generator = "generator" in __import__("inspect").signature(scheduler.step).parameters
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = ref.unet(x, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": cond}).sample
            out = out[:, : latents.shape[1]]
            uncond, text = out.chunk(2)
            out = uncond + guidance * (text - uncond)
            latents = scheduler.step(out, t, latents, **({"generator": g} if takes_generator else {})).prev_sample
    return latents


@pytest.mark.parametrize("name", GENERAL)
def test_every_sampler_in_the_kandinsky_decoder_matches_the_reference(decoder, name):
    """Compared on the latents: the two UNets round differently in the last float32 bit (3e-7 of the
    latents' scale after 6 steps here), which the tiny random MoVQ would amplify to 2e-4 in pixels."""
    ours, ref = decoder
    e, n = embeds()
    mine = type(ours).from_pipe(ours, scheduler=scheduler_for(name, ours.scheduler.config))
    got = mine(image_embeds=e, negative_image_embeds=n, height=64, width=64, num_inference_steps=6,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    if name in REFERENCE_PIPELINE_RIGHT:
        other = type(ref).from_pipe(ref, scheduler=reference_scheduler(name, ref.scheduler.config))
        expected = other(image_embeds=e, negative_image_embeds=n, height=64, width=64, num_inference_steps=6,
                         generator=torch.Generator().manual_seed(3), output_type="latent").images
    else:
        expected = standard_loop(ref, reference_scheduler(name, ref.scheduler.config), e, n, 6, 3)
    scale = float(expected.abs().max())
    assert_close(got / scale, expected / scale, 1e-5)
    assert scale > 0


@pytest.mark.parametrize("name", ["heun", "dpm++2m-karras", "unipc"])
def test_samplers_in_the_upscaler_with_its_karras_wrapper(upscaler_folder, name):
    """The reference's upscaler loop (scale_model_input, sigmas[i], c_skip/c_out) is right for Heun and
    wrong for the variance-preserving samplers; ours treats both through the noise level it is told."""
    ours = load(cascade, "StableDiffusionLatentUpscalePipeline", upscaler_folder)
    ours.scheduler = scheduler_for(name, ours.scheduler.config)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    args = dict(prompt="a cat", image=image, num_inference_steps=5, output_type="np")
    got = ours(generator=torch.Generator().manual_seed(1), **args).images
    assert np.isfinite(got).all()
    if name == "heun":
        ref = load(diffusers, "StableDiffusionLatentUpscalePipeline", upscaler_folder)
        ref.scheduler = reference_scheduler(name, ref.scheduler.config)
        assert_close(got, ref(generator=torch.Generator().manual_seed(1), **args).images, 1e-4)
    again = ours(generator=torch.Generator().manual_seed(1), **args).images
    assert np.array_equal(got, again)


def test_upscaler_rejects_a_sampler_that_cannot_read_its_outputs(upscaler_folder):
    ours = load(cascade, "StableDiffusionLatentUpscalePipeline", upscaler_folder)
    ours.scheduler = cascade.DDIMScheduler()  # prediction_type epsilon: the wrapper returns x0
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        ours(prompt="a cat", image=torch.rand(1, 3, 32, 32), num_inference_steps=2)


@pytest.mark.parametrize("name", GENERAL)
def test_every_sampler_in_every_kandinsky_stage(kandinsky_root, name):
    combined = load(cascade, "KandinskyV22CombinedPipeline", kandinsky_root / "combined_text2img")
    combined.scheduler = scheduler_for(name, combined.scheduler.config)
    combined.prior_scheduler = scheduler_for(name, combined.prior_scheduler.config)
    run = dict(prompt="a red cat", num_inference_steps=4, prior_num_inference_steps=4, height=64, width=64,
               output_type="np")
    a = combined(generator=torch.Generator().manual_seed(0), **run).images
    b = combined(generator=torch.Generator().manual_seed(0), **run).images
    assert np.isfinite(a).all() and np.array_equal(a, b)
    img2img = load(cascade, "KandinskyV22Img2ImgCombinedPipeline", kandinsky_root / "combined_img2img")
    img2img.scheduler = scheduler_for(name, img2img.scheduler.config)
    out = img2img(image=torch.rand(1, 3, 64, 64), strength=0.5, generator=torch.Generator().manual_seed(0),
                  **run).images
    assert np.isfinite(out).all()


def test_prior_with_dpm_solver_matches_the_standard_loop(kandinsky_root):
    """The reference's prior loop passes `prev_timestep` to step(), which only UnCLIPScheduler takes; the
    standard loop with the reference's prior and DPM-Solver++ is the expectation."""
    folder = kandinsky_root / "prior"
    ours = load(cascade, "KandinskyV22PriorPipeline", folder)
    ref = load(diffusers, "KandinskyV22PriorPipeline", folder)
    ours.scheduler = scheduler_for("dpm++2m", ours.scheduler.config)
    scheduler = reference_scheduler("dpm++2m", ref.scheduler.config)
    latents = torch.randn(1, ref.prior.config.embedding_dim, generator=torch.Generator().manual_seed(5))
    got = ours("a red cat", num_inference_steps=5, latents=latents.clone(), guidance_scale=1.0).image_embeds
    tokens = ref.tokenizer(["a red cat"], padding="max_length", max_length=ref.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
    with torch.no_grad():
        text = ref.text_encoder(tokens.input_ids)
        scheduler.set_timesteps(5)
        x = latents.clone()
        for t in scheduler.timesteps:
            out = ref.prior(x, timestep=t, proj_embedding=text.text_embeds,
                            encoder_hidden_states=text.last_hidden_state,
                            attention_mask=tokens.attention_mask.bool()).predicted_image_embedding
            x = scheduler.step(out, t, x).prev_sample
        expected = ref.prior.post_process_latents(x)
    assert_close(got, expected, 1e-5)


@pytest.mark.parametrize("name", ["dpm++2m", "heun", "euler-a"])
def test_unclip_stages_take_the_samplers(unclip_root, name):
    pipe = load(cascade, "UnCLIPPipeline", unclip_root / "unclip")
    for stage in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        setattr(pipe, stage, scheduler_for(name, getattr(pipe, stage).config))
    out = pipe("a cat", prior_num_inference_steps=3, decoder_num_inference_steps=3,
               super_res_num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(out.images).all()


def test_wuerstchen_names_the_sampler_it_runs(wuerstchen_root):
    pipe = load(cascade, "WuerstchenPriorPipeline", wuerstchen_root / "prior")
    pipe.scheduler = cascade.DDIMScheduler()
    with pytest.raises(ValueError, match="DDPMWuerstchenScheduler"):
        pipe("a cat", height=128, width=128, num_inference_steps=2)
    assert samplers_for(pipe) == ["wuerstchen"] and "dpm++2m" in samplers_for(cascade.UnCLIPPipeline)


def test_two_threads_on_one_pipeline_get_the_images_of_two_calls(kandinsky_root):
    """Per-call state only: concurrent calls on one pipeline (multistep memory, unCLIP stage, callbacks)
    equal the same calls made one after the other."""
    pipe = load(cascade, "KandinskyV22CombinedPipeline", kandinsky_root / "combined_text2img")
    pipe.scheduler = scheduler_for("unipc", pipe.scheduler.config)
    pipe.prior_scheduler = scheduler_for("dpm++2m", pipe.prior_scheduler.config)
    calls = [dict(prompt=p, generator=torch.Generator().manual_seed(s), num_inference_steps=8,
                  prior_num_inference_steps=6, height=64, width=64, output_type="np")
             for p, s in (("a red cat", 1), ("a blue dog", 2))]
    results = [None, None]
    torch.set_num_threads(1)  # both threads really interleave their steps (and kernels round alike)
    alone = [pipe(**{**c, "generator": torch.Generator().manual_seed(s)}).images
             for c, s in zip(calls, (1, 2))]

    def work(k):
        results[k] = pipe(**calls[k]).images

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(2)
    for got, expected in zip(results, alone):
        assert np.array_equal(got, expected)
