"""What every one of the sixteen pipelines offers: validated callback inputs, callbacks that act, CPU offload
with unchanged output."""
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_close, load

import cascade


def picture(size=32, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask(size=32):
    m = np.zeros((size, size), np.uint8)
    m[8:24, 4:20] = 255
    return PIL.Image.fromarray(m)


def embeds():
    g = torch.Generator().manual_seed(0)
    return dict(image_embeds=torch.randn(1, 32, generator=g),
                negative_image_embeds=torch.randn(1, 32, generator=g))


K = dict(height=32, width=32, num_inference_steps=2)
PRIOR = dict(prompt="a cat", num_inference_steps=2)
COMBINED = dict(prompt="a cat", prior_num_inference_steps=2, **K)
HINT = dict(hint=torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)))
UNCLIP = dict(decoder_num_inference_steps=2, super_res_num_inference_steps=2)

# name: (root fixture, subfolder, arguments)
CASES = {
    "KandinskyV22PriorPipeline": ("kandinsky_root", "prior", PRIOR),
    "KandinskyV22PriorEmb2EmbPipeline": ("kandinsky_root", "prior", dict(image=[picture()], strength=0.9, **PRIOR)),
    "KandinskyV22Pipeline": ("kandinsky_root", "text2img", dict(**embeds(), **K)),
    "KandinskyV22Img2ImgPipeline": ("kandinsky_root", "text2img", dict(image=picture(), strength=1.0, **embeds(), **K)),
    "KandinskyV22InpaintPipeline": ("kandinsky_root", "inpaint", dict(image=picture(), mask_image=mask(), **embeds(),
                                                                      **K)),
    "KandinskyV22ControlnetPipeline": ("kandinsky_root", "controlnet", dict(**HINT, **embeds(), **K)),
    "KandinskyV22ControlnetImg2ImgPipeline": ("kandinsky_root", "controlnet",
                                              dict(image=picture(), strength=1.0, **HINT, **embeds(), **K)),
    "KandinskyV22CombinedPipeline": ("kandinsky_root", "combined_text2img", COMBINED),
    "KandinskyV22Img2ImgCombinedPipeline": ("kandinsky_root", "combined_img2img",
                                            dict(image=picture(), strength=1.0, **COMBINED)),
    "KandinskyV22InpaintCombinedPipeline": ("kandinsky_root", "combined_inpaint",
                                            dict(image=picture(), mask_image=mask(), **COMBINED)),
    "UnCLIPPipeline": ("unclip_root", "unclip", dict(prompt="a cat", prior_num_inference_steps=2, **UNCLIP)),
    "UnCLIPImageVariationPipeline": ("unclip_root", "variation", dict(image=picture(40), **UNCLIP)),
    "StableDiffusionLatentUpscalePipeline": ("upscaler_folder", None,
                                             dict(prompt="a cat", image=picture(16), num_inference_steps=2)),
    "WuerstchenPriorPipeline": ("wuerstchen_root", "prior", dict(prompt="a cat", num_inference_steps=2,
                                                                 height=128, width=128)),
    "WuerstchenDecoderPipeline": ("wuerstchen_root", "decoder",
                                  dict(image_embeddings=torch.randn(1, 4, 3, 3, generator=torch.Generator()
                                                                    .manual_seed(2)), prompt="a cat",
                                       num_inference_steps=2)),
    "WuerstchenCombinedPipeline": ("wuerstchen_root", "combined", dict(prompt="a cat", prior_num_inference_steps=2,
                                                                       num_inference_steps=2, height=128,
                                                                       width=128)),
}
NAMES = sorted(CASES)


@pytest.fixture(scope="module")
def pipes(request):
    cache = {}

    def get(name):
        if name not in cache:
            fixture, sub, _ = CASES[name]
            root = request.getfixturevalue(fixture)
            cache[name] = load(cascade, name, root / sub if sub else root)
        return cache[name]

    return get


def result(out):
    """The main tensor of any pipeline's output, as numbers."""
    first = out[0]
    if isinstance(first, list) and hasattr(first[0], "convert"):
        return np.stack([np.asarray(i, np.float64) for i in first]) / 255
    return first.cpu().float().numpy() if isinstance(first, torch.Tensor) else np.asarray(first)


def call(pipe, name, **extra):
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in CASES[name][2].items()}
    return result(pipe(**args, generator=torch.Generator().manual_seed(0), **extra))


def test_every_pipeline_is_covered():
    assert len(NAMES) == 16 and all(hasattr(cascade, n) for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_callback_tensor_is_rejected_before_any_model_runs(pipes, name):
    pipe = pipes(name)
    ran = []
    hooks = [m.register_forward_pre_hook(lambda *a: ran.append(1)) for m in pipe.modules().values()]
    try:
        with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
            call(pipe, name, callback_on_step_end=lambda *a: {},
                 callback_on_step_end_tensor_inputs=["latents", "not_a_tensor"])
    finally:
        for h in hooks:
            h.remove()
    assert not ran


@pytest.mark.parametrize("name", NAMES)
def test_callback_sees_every_step_and_its_latents_change_the_result(pipes, name):
    pipe = pipes(name)
    plain = call(pipe, name)
    steps = []

    def record(p, i, t, kwargs):
        steps.append(i)
        return {}

    assert_close(call(pipe, name, callback_on_step_end=record), plain, 0)
    assert steps and steps[0] == 0
    changed = call(pipe, name, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0.5})
    assert np.abs(changed - plain).max() > 1e-4


@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
@pytest.mark.parametrize("name", NAMES)
def test_cpu_offload_gives_the_same_output(pipes, name, offload):
    pipe = pipes(name)
    plain = call(pipe, name)
    getattr(pipe, offload)(device="cpu")
    try:
        assert_close(call(pipe, name), plain, 0)
    finally:
        pipe.remove_all_hooks()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_reduced_precision_loads_and_stays_finite(request, name, dtype):
    """Closeness to float32 is measured where the noise can be held equal (test_features, test_wuerstchen):
    a seed draws other numbers in other dtypes, in the reference as here."""
    fixture, sub, _ = CASES[name]
    root = request.getfixturevalue(fixture)
    half = load(cascade, name, root / sub if sub else root, torch_dtype=dtype)
    assert all(p.dtype == dtype for m in half.modules().values() for p in m.parameters())
    out = call(half, name)
    assert np.isfinite(out).all() and np.abs(out).max() > 0


DENOISERS = [("KandinskyV22PriorPipeline", "prior"), ("KandinskyV22Pipeline", "unet"),
             ("UnCLIPPipeline", "decoder"), ("UnCLIPPipeline", "super_res_first"),
             ("UnCLIPPipeline", "text_proj"), ("WuerstchenPriorPipeline", "prior"),
             ("WuerstchenDecoderPipeline", "decoder"), ("StableDiffusionLatentUpscalePipeline", "unet")]


@pytest.mark.parametrize("name,component", DENOISERS)
def test_denoisers_compile_whole_with_no_graph_breaks(pipes, name, component):
    """As the Würstchen page compiles its prior and decoder: fullgraph=True, with the inputs a run gives them."""
    pipe = pipes(name)
    model = getattr(pipe, component)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)) or None,
                                           with_kwargs=True)
    try:
        call(pipe, name)
    finally:
        hook.remove()
    args, kwargs = seen[0]
    assert torch._dynamo.explain(model)(*args, **kwargs).graph_break_count == 0
    if component in ("prior", "decoder") and name.startswith("Wuerstchen"):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            assert_close(compiled(*args, **kwargs), model(*args, **kwargs), 1e-5)


def reference_drift(request, name) -> float:
    """How far the reference's own attention slicing moves this case's output (relative), on this machine."""
    import diffusers

    fixture, sub, _ = CASES[name]
    ref = load(diffusers, name, request.getfixturevalue(fixture) / sub)
    plain = call(ref, name, output_type="np")
    ref.enable_attention_slicing("max")
    moved = float(np.abs(call(ref, name, output_type="np") - plain).max())
    return moved / max(1.0, float(np.abs(plain).max()))


# The tiny inpainting UNet amplifies float rounding: the reference's own slicing moves this case by 1.3e-4
# (measured here) to 3.5e-4 (another machine), ours by 3.5e-5 to 1.9e-4. Its bound is measured, not fixed.
AMPLIFYING = {"KandinskyV22InpaintPipeline"}


@pytest.mark.parametrize("name", NAMES)
def test_attention_slicing_and_memory_efficient_attention_keep_the_output(request, pipes, name):
    pipe = pipes(name)
    run = lambda: call(pipe, name, output_type="np")  # noqa: E731 (numbers: 8-bit rounding would hide 1e-4)
    plain = run()
    scale = max(1.0, float(np.abs(plain).max()))
    # Equivalent computations rounded otherwise: within 1e-4, or twice the reference's own move where the
    # model amplifies rounding (ours and the reference's may round opposite ways).
    bound = max(1e-4, 2 * reference_drift(request, name)) if name in AMPLIFYING else 1e-4
    for enable, disable in ((lambda: pipe.enable_attention_slicing("max"), pipe.disable_attention_slicing),
                            (pipe.enable_xformers_memory_efficient_attention,
                             pipe.disable_xformers_memory_efficient_attention)):
        enable()
        try:
            assert_close(run() / scale, plain / scale, bound)
        finally:
            disable()
    assert_close(run(), plain, 0)


@pytest.mark.parametrize("name", [n for n in NAMES if "Combined" in n])
def test_combined_pipelines_check_prior_callback_inputs_first(pipes, name):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        call(pipes(name), name, prior_callback_on_step_end=lambda *a: {},
             prior_callback_on_step_end_tensor_inputs=["not_a_tensor"])
