"""Features every pipeline shares: offload, reuse across pipelines, auto pipelines, compile, reduced precision."""
import numpy as np
import pytest
import torch
from conftest import assert_close

import cascade
from cascade.pipelines import offload

SIZE = dict(height=32, width=32, num_inference_steps=2)


def embeds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)


def run(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(*embeds(), generator=torch.Generator().manual_seed(0), output_type="np", **SIZE, **kw).images


@pytest.fixture
def decoder(kandinsky_root):
    return cascade.KandinskyV22Pipeline.from_pretrained(kandinsky_root / "text2img")


def test_model_offload_moves_each_model_when_it_runs(decoder, monkeypatch):
    plain = run(decoder)
    names = {id(m): n for n, m in decoder.modules().items()}
    log = []
    real_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if id(self) in names:
            log.append((names[id(self)], str(torch.device(args[0] if args else kwargs["device"]))))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    decoder.enable_model_cpu_offload(device="cpu:0")
    assert decoder.device == torch.device("cpu:0")
    log.clear()
    out = run(decoder)
    # The UNet comes to the device for its first step and stays for the next; MoVQ replaces it for decoding
    # and goes back when the call ends.
    assert log == [("unet", "cpu:0"), ("unet", "cpu"), ("movq", "cpu:0"), ("movq", "cpu")]
    assert_close(out, plain, 0)
    decoder.remove_all_hooks()


def test_sequential_offload_visits_every_weight_holder(decoder, monkeypatch):
    plain = run(decoder)
    moves = []
    real = offload.move_own
    monkeypatch.setattr(offload, "move_own", lambda m, d: moves.append(str(d)) or real(m, d))
    decoder.enable_sequential_cpu_offload(device="cpu")
    out = run(decoder)
    holders = sum(1 for model in decoder.modules().values() for m in model.modules()
                  if next(m.parameters(recurse=False), None) is not None)
    assert moves.count("cpu") >= 2 * holders  # each holder came and went at least once
    assert_close(out, plain, 0)


def test_offload_combined_pipeline(kandinsky_root):
    pipe = cascade.KandinskyV22CombinedPipeline.from_pretrained(kandinsky_root / "combined_text2img")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", prior_num_inference_steps=2, output_type="np", **SIZE)
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe.prior_pipe.device == torch.device("cpu")
    assert_close(pipe(generator=torch.Generator().manual_seed(0), **kw).images, plain, 0)


def test_from_pipe_shares_components(decoder):
    img2img = cascade.KandinskyV22Img2ImgPipeline.from_pipe(decoder)
    assert img2img.unet is decoder.unet and img2img.movq is decoder.movq
    with pytest.raises(ValueError, match="prior"):
        cascade.KandinskyV22CombinedPipeline.from_pipe(decoder)


@pytest.mark.parametrize("auto,expected,folder", [
    ("AutoPipelineForText2Image", "KandinskyV22CombinedPipeline", "combined_text2img"),
    ("AutoPipelineForImage2Image", "KandinskyV22Img2ImgCombinedPipeline", "combined_text2img"),
    ("AutoPipelineForInpainting", "KandinskyV22InpaintCombinedPipeline", "combined_inpaint"),
])
def test_auto_pipelines(kandinsky_root, auto, expected, folder):
    pipe = getattr(cascade, auto).from_pretrained(kandinsky_root / folder)
    assert type(pipe).__name__ == expected
    again = cascade.AutoPipelineForText2Image.from_pipe(pipe)
    assert type(again).__name__ == "KandinskyV22CombinedPipeline" and again.unet is pipe.unet


def test_auto_pipeline_rejects_unknown_family(kandinsky_root):
    with pytest.raises(ValueError, match="no auto pipeline"):
        cascade.AutoPipelineForText2Image.from_pipe(object())


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 0.05), (torch.bfloat16, 0.1)])
def test_reduced_precision_close_to_float32(kandinsky_root, dtype, atol):
    full = cascade.KandinskyV22Pipeline.from_pretrained(kandinsky_root / "text2img")
    half = cascade.KandinskyV22Pipeline.from_pretrained(kandinsky_root / "text2img", torch_dtype=dtype)
    assert half.unet.dtype == dtype and half.movq.dtype == dtype
    a, b = run(full), run(half)
    assert np.isfinite(b).all()
    assert np.abs(a - b).mean() < atol


def test_compiled_models_have_no_graph_breaks_and_match_eager(decoder):
    unet = decoder.unet
    x = torch.randn(2, 4, 16, 16)
    cond = {"image_embeds": torch.randn(2, 32)}
    t = torch.tensor(10)
    explain = torch._dynamo.explain(unet)(x, t, None, added_cond_kwargs=cond, return_dict=False)
    assert explain.graph_break_count == 0
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x, t, None, added_cond_kwargs=cond, return_dict=False)[0],
                     unet(x, t, None, added_cond_kwargs=cond, return_dict=False)[0], 1e-5)
    movq = decoder.movq
    z = torch.randn(1, 4, 16, 16)
    assert torch._dynamo.explain(movq.decode)(z, force_not_quantize=True).graph_break_count == 0
