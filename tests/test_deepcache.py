"""DeepCache step caching (cascade/deepcache.py): the split UNet, the per-call cache, the pipeline switch."""
import functools
import itertools
import threading

import pytest
import torch
from test_latent_upscale import TINY_UNET, low_res_latents, one_thread  # noqa: F401 (a fixture)

import cascade
from cascade import deepcache, presets
from cascade import demo_world as dw
from cascade.models import UNet2DConditionModel
from cascade.pipelines.core import numpy_to_pil

pytest.importorskip("diffusers")


SMALL = dict(block_out_channels=[32, 64, 96], layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
             down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 2,
             up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"])
# Every block layout and conditioning path of the pipelines' decoders, three or four levels deep:
# config, the sample's channels and size, the conditioning for a batch of b.
KANDINSKY = dict(**SMALL, cross_attention_dim=32, encoder_hid_dim=32, addition_embed_type_num_heads=4)
LAYOUTS = {
    "kandinsky": (dict(presets.KANDINSKY22_UNET, **KANDINSKY), 4, 8,
                  lambda b: dict(added_cond_kwargs={"image_embeds": torch.randn(b, 32)})),
    "kandinsky controlnet": (dict(presets.KANDINSKY22_CONTROLNET_UNET, **KANDINSKY), 4, 8,
                             lambda b: dict(added_cond_kwargs={"image_embeds": torch.randn(b, 32),
                                                               "hint": torch.rand(b, 3, 64, 64)})),
    "unclip": (dict(presets.KARLO_DECODER, **SMALL, cross_attention_dim=24), 3, 8,
               lambda b: dict(encoder_hidden_states=torch.randn(b, 5, 24), class_labels=torch.randn(b, 128))),
    "upscaler (k-diffusion blocks)": (TINY_UNET, 8, 16,
                                      lambda b: dict(encoder_hidden_states=torch.randn(b, 5, 32),
                                                     timestep_cond=torch.randn(b, 160))),
}


def unet_and_inputs(layout):
    config, channels, size, conditions = LAYOUTS[layout]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    return unet, torch.randn(2, channels, size, size), {**conditions(2), "return_dict": False}


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_a_cached_step_reuses_the_deep_features_of_the_last_full_one(layout):
    """On the input of the full step, a cached step gives the plain output bit for bit (the split loses
    nothing); on another input, it differs (the deep features are the old input's)."""
    unet, x, kw = unet_and_inputs(layout)
    plain, other = unet(x, 10, **kw)[0], unet(x * 0.5, 10, **kw)[0]
    levels = len(unet.down_blocks)
    for branch in range(levels - 1):
        unet.enable_deepcache(cache_interval=2, cache_branch_id=branch)
        with deepcache.call_scope():
            steps = [unet(sample, 10, **kw)[0] for sample in (x, x, x * 0.5, x * 0.5, x * 0.5, x)]
        assert torch.equal(steps[0], plain) and torch.equal(steps[1], plain)
        assert all(torch.equal(out, other) for out in steps[2:5])  # calls 2 and 4 run in full
        assert not torch.allclose(steps[5], plain, atol=1e-4)  # x on the deep features of x * 0.5
    unet.disable_deepcache()
    assert torch.equal(unet(x, 10, **kw)[0], plain)


@torch.no_grad()
def test_interval_one_runs_every_step_whole():
    """`--deepcache 1` is how a demo recipe (DeepCache 3 by default) asks for the plain UNet."""
    unet, x, kw = unet_and_inputs("kandinsky")
    plain = [unet(x * s, 10, **kw)[0] for s in (1, 0.5, 0.25)]
    unet.enable_deepcache(cache_interval=1)
    with deepcache.call_scope():
        assert all(torch.equal(unet(x * s, 10, **kw)[0], p) for s, p in zip((1, 0.5, 0.25), plain))


def test_outside_a_call_every_forward_runs_in_full():
    unet, x, kw = unet_and_inputs("kandinsky")
    with torch.no_grad():
        plain = unet(x, 10, **kw)[0]
        unet.enable_deepcache(5)
        unet(x * 0.5, 10, **kw)
        assert torch.equal(unet(x, 10, **kw)[0], plain)


@pytest.mark.parametrize("interval, branch, match", [
    (0, 0, "cache_interval must be an int >= 1, got 0"), (2.0, 0, "cache_interval"),
    (True, 0, "cache_interval"),
    (3, -1, r"cache_branch_id must be an int from 0 to 1 \(the UNet has 3 levels"), (3, 2, "cache_branch_id"),
    (3, "0", "cache_branch_id")])
def test_settings_are_checked(interval, branch, match):
    unet = unet_and_inputs("kandinsky")[0]
    with pytest.raises(ValueError, match=match):
        unet.enable_deepcache(interval, branch)
    assert unet.deepcache is None


# --------------------------------------------------------------------------------------------- pipelines

@pytest.fixture(scope="module")
def pipes(kandinsky_root, unclip_root, upscaler_folder):
    """name -> (our pipeline, a seeded call with fixed inputs giving a tensor)."""
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)

    def decoder(p, seed=0, steps=9):
        return p(embeds, negative, height=32, width=32, num_inference_steps=steps, output_type="pt",
                 generator=seeded(seed)).images

    def combined(p, seed=0, steps=9):
        return p("a cat", height=32, width=32, num_inference_steps=steps, prior_num_inference_steps=2,
                 output_type="pt", generator=seeded(seed)).images

    def unclip(p, seed=0, steps=9):
        return p("a cat", prior_num_inference_steps=2, decoder_num_inference_steps=steps,
                 super_res_num_inference_steps=2, output_type="np", generator=seeded(seed)).images

    def upscaler(p, seed=0, steps=9):
        return p("a cat", low_res_latents(), num_inference_steps=steps, output_type="pt",
                 generator=seeded(seed)).images

    out = {}
    for call, cls, folder in [
            (decoder, cascade.KandinskyV22Pipeline, kandinsky_root / "text2img"),
            (combined, cascade.KandinskyV22CombinedPipeline, kandinsky_root / "combined_text2img"),
            (unclip, cascade.UnCLIPPipeline, unclip_root / "unclip"),
            (upscaler, cascade.StableDiffusionLatentUpscalePipeline, upscaler_folder)]:
        pipe = cls.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        out[call.__name__] = (pipe, functools.partial(call, pipe))
    return out


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def as_tensor(images):
    return torch.as_tensor(images).double()


@pytest.mark.parametrize("name", ["decoder", "combined", "unclip", "upscaler"])
def test_off_after_on_gives_the_plain_output_exactly(pipes, name):
    pipe, call = pipes[name]
    plain = as_tensor(call())
    pipe.enable_deepcache(cache_interval=3)
    cached = as_tensor(call())
    pipe.disable_deepcache()
    assert torch.equal(as_tensor(call()), plain)
    # Random tiny models are no judge of how close: their largest difference is 44 % (decoder), 52 %
    # (combined), 100 % (unclip) of the plain output's largest value. The trained demo is, below.
    assert not torch.allclose(cached, plain, atol=1e-3)


@pytest.mark.parametrize("name, branch, deep, shallow", [
    ("decoder", 0, ["down_blocks.1", "mid_block", "up_blocks.0"], ["down_blocks.0", "up_blocks.1"]),
    ("upscaler", 1, ["down_blocks.2", "down_blocks.3", "up_blocks.0", "up_blocks.1"],
     ["down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3"])])
def test_cached_steps_skip_the_deep_blocks(pipes, name, branch, deep, shallow):
    pipe, call = pipes[name]
    unet, counts = pipe.unet, {}

    def count(module, args, output, key):
        counts[key] = counts.get(key, 0) + 1

    downsampler = f"down_blocks.{branch}.downsamplers.0"
    hooks = [unet.get_submodule(k).register_forward_hook(functools.partial(count, key=k))
             for k in deep + shallow + [downsampler]]
    pipe.enable_deepcache(cache_interval=3, cache_branch_id=branch)
    try:
        call(steps=9)
    finally:
        pipe.disable_deepcache()
        for h in hooks:
            h.remove()
    assert counts == {**dict.fromkeys(deep + [downsampler], 3), **dict.fromkeys(shallow, 9)}


def test_two_threads_on_one_pipeline_get_the_images_of_one_call_after_the_other(pipes):
    pipe, call = pipes["decoder"]
    pipe.enable_deepcache(cache_interval=3)
    try:
        alone = [call(seed=seed, steps=12) for seed in (0, 1)]
        together, start = [None, None], threading.Barrier(2)

        def run(i):
            start.wait()
            together[i] = call(seed=i, steps=12)

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pipe.disable_deepcache()
    assert not torch.equal(alone[0], alone[1])
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])


def test_a_deepcache_block_is_one_thread_s_own_choice(pipes):
    """`with pipe.deepcache(...)`: a server's request with DeepCache beside one without, on one pipeline."""
    pipe, call = pipes["decoder"]
    plain = call(seed=0, steps=12)
    with pipe.deepcache(cache_interval=3):
        cached = call(seed=1, steps=12)
    pipe.enable_deepcache(cache_interval=2)
    with pipe.deepcache(None):  # off for this block only
        assert torch.equal(call(seed=0, steps=12), plain)
    pipe.disable_deepcache()
    with pytest.raises(ValueError, match="cache_branch_id must be an int from 0 to 0"):
        pipe.deepcache(cache_interval=3, cache_branch_id=1)
    together, start = [None, None], threading.Barrier(2)

    def run(i):
        start.wait()
        if i == 0:
            together[0] = call(seed=0, steps=12)
            return
        with pipe.deepcache(cache_interval=3):
            together[1] = call(seed=1, steps=12)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(together[0], plain) and torch.equal(together[1], cached)
    with pipe.deepcache(cache_interval=3):
        assert not torch.equal(call(seed=0, steps=12), plain)
    assert pipe.unet.deepcache is None


DECODER_PIPELINES = {  # pipeline class name: the folder it loads
    "KandinskyV22Pipeline": "text2img", "KandinskyV22Img2ImgPipeline": "text2img",
    "KandinskyV22InpaintPipeline": "inpaint", "KandinskyV22ControlnetPipeline": "controlnet",
    "KandinskyV22ControlnetImg2ImgPipeline": "controlnet",
    "KandinskyV22CombinedPipeline": "combined_text2img",
    "KandinskyV22Img2ImgCombinedPipeline": "combined_img2img",
    "KandinskyV22InpaintCombinedPipeline": "combined_inpaint",
}
OTHER_PIPELINES = {"KandinskyV22PriorPipeline": "prior", "KandinskyV22PriorEmb2EmbPipeline": "prior",
                   "WuerstchenPriorPipeline": "prior", "WuerstchenDecoderPipeline": "decoder",
                   "WuerstchenCombinedPipeline": "combined"}


def test_every_pipeline_with_a_unet_decoder_takes_it_and_the_others_raise(kandinsky_root, unclip_root,
                                                                             wuerstchen_root, pipes):
    takes = [(getattr(cascade, name), kandinsky_root / folder) for name, folder in DECODER_PIPELINES.items()]
    takes += [(cascade.UnCLIPPipeline, unclip_root / "unclip"),
              (cascade.UnCLIPImageVariationPipeline, unclip_root / "variation")]
    for cls, folder in takes:
        pipe = cls.from_pretrained(folder)
        unet = pipe.decoder if "UnCLIP" in cls.__name__ else pipe.unet
        pipe.enable_deepcache(cache_interval=4, cache_branch_id=0)
        assert unet.deepcache == deepcache.DeepCache(4, 0), cls.__name__
        pipe.disable_deepcache()
        assert unet.deepcache is None
    upscaler = pipes["upscaler"][0]
    upscaler.enable_deepcache(2, 2)  # four levels
    assert upscaler.unet.deepcache == deepcache.DeepCache(2, 2)
    upscaler.disable_deepcache()
    for name, folder in OTHER_PIPELINES.items():
        cls, root = getattr(cascade, name), kandinsky_root if "Kandinsky" in name else wuerstchen_root
        pipe = cls.from_pretrained(root / folder)
        with pytest.raises(ValueError, match=f"{cls.__name__} has no UNet2DConditionModel decoder for "
                                             "DeepCache; it runs on the Kandinsky 2.2 decoder pipelines"):
            pipe.enable_deepcache()
        with pytest.raises(ValueError, match="has no UNet2DConditionModel decoder"):
            pipe.deepcache(cache_interval=3)
        with pipe.deepcache(None):  # nothing to switch off
            pipe.disable_deepcache()


def test_on_the_demo_the_picture_stays_close_and_keeps_its_caption():
    """The trained demo, 30 decoder steps, interval 3. Measured mean difference per pixel (in [0, 1]) from
    the plain image of the same seed: 0.035, 0.092, 0.004, 0.008; from the plain image of another seed:
    0.137, 0.161, 0.030, 0.066. Shape and background colours stay right."""
    pipe = cascade.KandinskyV22CombinedPipeline.from_pretrained("demo")
    pipe.set_progress_bar_config(disable=True)
    captions = [c for _, c, _ in itertools.islice(dw.world(99), 4)]

    def draw(seeds):
        images = pipe(captions, height=dw.SIZE, width=dw.SIZE, num_inference_steps=30, output_type="np",
                      generator=[seeded(i) for i in seeds]).images
        return torch.as_tensor(images)

    plain, other = draw(range(4)), draw(range(4, 8))
    pipe.enable_deepcache(cache_interval=3)
    try:
        cached = draw(range(4))
    finally:
        pipe.disable_deepcache()
    to_plain = (cached - plain).abs().mean(dim=(1, 2, 3))
    to_other = (other - plain).abs().mean(dim=(1, 2, 3))
    assert (to_plain > 0).all() and (to_plain < to_other).all() and to_plain.mean() < to_other.mean() / 2
    score = dw.score(numpy_to_pil(cached.numpy()), captions)
    assert score["shape_colour"] == score["background_colour"] == 1
