"""Bad input, tried as a careless or hostile user would: each ends in a named error of the right type,
before any model runs, within a second; images of other depths are read by their real range; a NaN appearing
in a stage raises instead of giving a black picture."""
import time

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import load

import cascade
from cascade.pipelines import checks

DIM = 32
G = torch.Generator().manual_seed(0)
EMBEDS = dict(image_embeds=torch.randn(1, DIM, generator=G), negative_image_embeds=torch.randn(1, DIM, generator=G))
K = dict(height=32, width=32, num_inference_steps=2)
COMBINED = dict(prompt="a cat", prior_num_inference_steps=2, **K)
NAN = torch.full((1, DIM), float("nan"))


def picture(size=32):
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipes(request):
    cache = {}

    def get(name, sub):
        if (name, sub) not in cache:
            root = request.getfixturevalue(ROOTS[name.split("V22")[0].split("Pipeline")[0]])
            cache[name, sub] = load(cascade, name, root / sub)
        return cache[name, sub]

    return get


ROOTS = {"Kandinsky": "kandinsky_root", "UnCLIP": "unclip_root", "Wuerstchen": "wuerstchen_root",
         "WuerstchenCombined": "wuerstchen_root", "WuerstchenPrior": "wuerstchen_root",
         "WuerstchenDecoder": "wuerstchen_root", "UnCLIPImageVariation": "unclip_root"}

# (pipeline, folder, good arguments, bad ones, exception, words the message must hold)
BAD = [
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(num_inference_steps=-1), ValueError, "num_inference_steps"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(num_inference_steps=2.5), TypeError, "num_inference_steps"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(num_inference_steps=True), TypeError, "num_inference_steps"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(num_inference_steps=1001), ValueError, "1000 timesteps"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(guidance_scale="4"), TypeError, "guidance_scale"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(height=0), ValueError, "height"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(height=-64), ValueError, "height"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(height=34, width=36), ValueError, "36x34"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(height="64"), TypeError, "height"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(num_images_per_prompt=0), ValueError,
     "num_images_per_prompt"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(num_images_per_prompt=1.0), TypeError,
     "num_images_per_prompt"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(image_embeds=NAN), ValueError, "image_embeds"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(latents=torch.full((1, 4, 16, 16), float("inf"))),
     ValueError, "latents"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(height=100032, width=100032), MemoryError, "GiB"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(num_images_per_prompt=10**6), MemoryError, "GiB"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(guidance=4), TypeError, "guidance"),
    ("KandinskyV22Pipeline", "text2img", EMBEDS, dict(callback_step=2), TypeError, "callback_step"),
    ("KandinskyV22Img2ImgPipeline", "text2img", dict(image=picture(), **EMBEDS), dict(strength=1.5), ValueError,
     "strength"),
    ("KandinskyV22Img2ImgPipeline", "text2img", dict(image=picture(), **EMBEDS), dict(strength=float("nan")),
     ValueError, "strength"),
    ("KandinskyV22Img2ImgPipeline", "text2img", EMBEDS, dict(image=np.zeros((32, 32, 3), np.int64)), TypeError,
     "image"),
    ("KandinskyV22ControlnetPipeline", "text2img", dict(hint=torch.rand(1, 3, 32, 32), **EMBEDS), {}, ValueError,
     "hint"),
    ("KandinskyV22Pipeline", "controlnet", EMBEDS, {}, ValueError, "hint"),
    ("KandinskyV22PriorPipeline", "prior", dict(prompt="a cat"), dict(num_inference_steps=10**9), ValueError,
     "num_inference_steps"),
    ("KandinskyV22PriorPipeline", "prior", dict(prompt="a cat"), dict(prompt=[]), TypeError, "prompt"),
    ("KandinskyV22PriorPipeline", "prior", dict(prompt="a cat"), dict(prompt=[1, 2]), TypeError, "prompt"),
    ("KandinskyV22PriorPipeline", "prior", dict(prompt="a cat"), dict(prompt=["ok", None]), TypeError, "prompt"),
    ("KandinskyV22PriorPipeline", "prior", dict(prompt="a cat"), dict(num_images_per_prompt=10**6), MemoryError,
     "GiB"),
    ("KandinskyV22CombinedPipeline", "combined_text2img", COMBINED, dict(prior_num_inference_step=3), TypeError,
     "prior_num_inference_step"),
    ("KandinskyV22CombinedPipeline", "combined_text2img", COMBINED, dict(prior_guidance_scale=float("nan")),
     ValueError, "prior_guidance_scale"),
    ("KandinskyV22CombinedPipeline", "combined_text2img", COMBINED, dict(prior_num_inference_steps=10**9),
     ValueError, "prior_num_inference_steps"),
    ("KandinskyV22CombinedPipeline", "combined_text2img", COMBINED, dict(height=34), ValueError, "32x34"),
    ("KandinskyV22CombinedPipeline", "combined_text2img", COMBINED,
     dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "got 2 prompts, negative_prompt has 1"),
    ("KandinskyV22CombinedPipeline", "combined_text2img", COMBINED, dict(num_images_per_prompt=10**6),
     MemoryError, "GiB"),
    ("KandinskyV22Img2ImgCombinedPipeline", "combined_img2img", dict(image=picture(), **COMBINED),
     dict(strength=-0.1), ValueError, "strength"),
    ("KandinskyV22InpaintCombinedPipeline", "combined_inpaint",
     dict(image=picture(), mask_image=np.zeros((32, 32), np.float32), **COMBINED), dict(prior_callback_step=1),
     TypeError, "prior_callback_step"),
    ("UnCLIPPipeline", "unclip", dict(prompt="a cat"), dict(prior_num_inference_steps=0), ValueError,
     "prior_num_inference_steps"),
    ("UnCLIPPipeline", "unclip", dict(prompt="a cat"), dict(decoder_guidance_scale=float("nan")), ValueError,
     "decoder_guidance_scale"),
    ("UnCLIPPipeline", "unclip", dict(prompt="a cat"), dict(super_res_num_inference_steps=1.5), TypeError,
     "super_res_num_inference_steps"),
    ("UnCLIPPipeline", "unclip", dict(prompt="a cat"), dict(num_images_per_prompt=10**6), MemoryError, "GiB"),
    ("UnCLIPPipeline", "unclip", dict(prompt="a cat"), dict(prior_latent=torch.zeros(1, DIM)), TypeError,
     "prior_latent"),
    ("WuerstchenCombinedPipeline", "combined", dict(prompt="a cat", height=128, width=128),
     dict(prior_guidance_scal=2.0), TypeError, "prior_guidance_scal"),
    ("WuerstchenCombinedPipeline", "combined", dict(prompt="a cat", height=128, width=128),
     dict(prior_num_inference_steps=10**9), ValueError, "prior_num_inference_steps"),
    ("WuerstchenCombinedPipeline", "combined", dict(prompt="a cat", height=128, width=128),
     dict(height=40), ValueError, "height and width"),
    ("WuerstchenPriorPipeline", "prior", dict(prompt="a cat"), dict(guidance_scale=float("inf")), ValueError,
     "guidance_scale"),
    ("WuerstchenDecoderPipeline", "decoder", dict(image_embeddings=torch.randn(1, 4, 3, 3), prompt="a"),
     dict(image_embeddings=torch.full((1, 4, 3, 3), float("nan"))), ValueError, "image_embeddings"),
]


def ran_models(pipe):
    """A list that records every forward (or encode/decode) of the pipeline's models while the hooks stand."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in pipe.modules().values()]
    return calls, hooks


@pytest.mark.parametrize("name,sub,good,bad,error,words", BAD, ids=[f"{c[0]}-{list(c[3])}" for c in BAD])
def test_bad_input_is_named_before_any_model_runs(pipes, monkeypatch, name, sub, good, bad, error, words):
    # The same bound on every machine; should a check fail, the call must not get to allocate for real.
    monkeypatch.setattr(checks, "available_memory", lambda device: 4 * 2**30)
    pipe = pipes(name, sub)
    calls, hooks = ran_models(pipe)
    start = time.perf_counter()
    try:
        with pytest.raises(error, match=words.replace("[", r"\[")):
            pipe(**{**K, **good, **bad} if "Kandinsky" in name and "Prior" not in name else {**good, **bad})
    finally:
        for h in hooks:
            h.remove()
    assert not calls, "a model ran before the error"
    assert time.perf_counter() - start < 1.0


def test_demo_sizes_are_checked_against_the_unet_depth():
    pipe = cascade.KandinskyV22Pipeline.from_pretrained("demo")
    assert checks.size_multiple(pipe) == 32  # MoVQ 4x, then three halvings in the UNet
    for height in (16, 48, 80):
        with pytest.raises(ValueError, match=f"multiples of 32 px for this model, got 64x{height}"):
            pipe(**EMBEDS_DEMO(pipe), height=height, width=64, num_inference_steps=1)
    out = pipe(**EMBEDS_DEMO(pipe), height=96, width=32, num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 96, 32, 3) and np.isfinite(out).all()


def EMBEDS_DEMO(pipe):
    dim = pipe.unet.config.encoder_hid_dim
    return dict(image_embeds=torch.randn(1, dim), negative_image_embeds=torch.randn(1, dim))


def test_sixteen_bit_and_integer_images_are_read_by_their_range():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    png = checks.rescaled("image", PIL.Image.fromarray(ramp))  # PIL reads 16-bit grey PNGs as "I;16"/"I"
    got = np.asarray(png).astype(np.float64)
    assert png.mode == "L" and np.abs(got - ramp / 257).max() <= 0.5 and (got == 255).mean() < 0.01
    assert np.asarray(checks.rescaled("image", np.full((4, 4, 3), 200, np.uint8))).max() == 200
    assert np.asarray(checks.rescaled("image", np.full((4, 4, 3), 51400, np.uint16))).max() == 200
    t = checks.rescaled("image", torch.full((1, 3, 4, 4), 255, dtype=torch.uint8))
    assert t.dtype == torch.float32 and t.max() == 1.0
    assert checks.rescaled("hint", torch.full((1, 3, 4, 4), 65535, dtype=torch.uint16)).max() == 1.0
    mask = checks.rescaled("mask_image", torch.tensor([[0, 255]], dtype=torch.uint8))
    assert mask.tolist() == [[0.0, 1.0]]
    with pytest.raises(TypeError, match="image: torch.int64"):
        checks.rescaled("image", torch.zeros(1, 3, 4, 4, dtype=torch.int64))


def test_a_uint8_tensor_gives_the_image_its_float_copy_gives(pipes):
    pipe = pipes("KandinskyV22Img2ImgPipeline", "text2img")
    x = torch.from_numpy(np.array(picture())).permute(2, 0, 1)[None]
    run = lambda image: pipe(image=image, **EMBEDS, **K, strength=0.5, output_type="np",  # noqa: E731
                             generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(run(x), run(x.float() / 255))


def test_a_nan_appearing_in_a_stage_is_named_not_a_black_image(pipes):
    pipe = pipes("KandinskyV22CombinedPipeline", "combined_text2img")
    weight = pipe.prior_prior.proj_to_clip_embeddings.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(FloatingPointError, match=r"^prior \(KandinskyV22PriorPipeline\): .*NaN or inf"):
            pipe(**COMBINED)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    decoder = pipes("KandinskyV22Pipeline", "text2img")
    conv = decoder.movq.decoder.conv_out.bias
    saved = conv.detach().clone()
    try:
        with torch.no_grad():
            conv.fill_(float("inf"))
        with pytest.raises(FloatingPointError, match="^decoder: .*NaN or inf"):
            decoder(**EMBEDS, **K)
    finally:
        with torch.no_grad():
            conv.copy_(saved)
