"""Training the demo cascade (issue 6): every stage learns, runs are deterministic and resume exactly, and
train_all writes a checkpoint the combined pipeline loads and draws from. Narrow models, a few steps."""
import dataclasses
import math

import pytest
import torch

from cascade import demo_world as dw
from cascade import train as T


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops on a shared 2-core machine are far faster without intra-op threads waiting on each other.
    before = torch.get_num_threads()
    yield torch.set_num_threads(1)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parts():
    return T.build(seed=0, width=8)


def fixed(stage: T.Stage) -> T.Stage:
    """The same batch (and the same noise) at every step."""
    return dataclasses.replace(stage, batch=lambda step: stage.batch(0))


def test_every_caption_word_is_one_token(parts):
    tokenizer = parts["prior_tokenizer"]
    ids = tokenizer("a magenta triangle on a green background").input_ids
    assert len(ids) == 2 + 7
    assert len(tokenizer("an owl!").input_ids) > 2  # text outside the world still encodes


def test_stages_run_in_order_and_learn(parts, tmp_path):
    """Few steps each, in order (each stage uses the frozen ones before it); MoVQ and decoder losses fall."""
    names = []
    for stage in T.stages(parts, seed=0, batch_size=2, images=8):
        names.append(stage.name)
        steps = 20 if stage.name in ("movq", "decoder", "inpaint") else 3  # batches of 2 keep it fast
        stage = fixed(stage) if steps == 20 else stage
        losses = T.train(stage, tmp_path, steps=steps)
        assert len(losses) == steps and all(math.isfinite(v) for v in losses), stage.name
        if steps == 20:
            assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), (stage.name, losses)
        T.freeze(stage.model)
    assert names == list(T.STAGES)
    prior = parts["prior_prior"]
    assert (prior.clip_std > 0).all() and not prior.clip_std.requires_grad
    assert parts["unet_inpaint"].conv_in.weight.shape[1] == 9


def test_standardised_latents_decode_to_the_same_images():
    parts = T.build(seed=1, width=8)
    movq, batch = parts["movq"], T.world_batch(7, 0, 8)
    x = batch["pixels"] / 127.5 - 1
    with torch.no_grad():
        before = movq.decode(movq.encode(x).latents, force_not_quantize=True).sample
        T.standardise_latents(parts, batch)
        latents = movq.encode(x).latents
        after = movq.decode(latents, force_not_quantize=True).sample
    torch.testing.assert_close(latents.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(latents.std((0, 2, 3)), torch.ones(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_inpainting_masks_cover_what_they_should():
    batch = T.world_batch(3, 0, 64)
    masks = T.repaint_masks(batch)
    assert masks.shape == (64, 1, dw.SIZE, dw.SIZE) and set(masks.unique().tolist()) == {0.0, 1.0}
    covers_shape = [bool(m[0][torch.from_numpy(dw.mask(a["shape"], a["side"], a["x"], a["y"]))].all())
                    for m, a in zip(masks, batch["attributes"])]
    assert 0.2 < sum(covers_shape) / len(covers_shape) < 1  # half are the shape's box, half anywhere
    assert (masks.sum((1, 2, 3)) >= 8 * 8).all()


def test_decoders_train_on_encoded_world_images(parts):
    """Each row of an encoded batch is one world image: its latents and embedding are those of the image its
    attributes draw, and its guided embedding is one of the prior's samples for the same caption."""
    world = T.encode_world(parts, seed=5, n=6, per_caption=2)
    batch = T.encoded_batch(lambda: world, seed=0, step=3, size=4)
    assert batch["attributes"] == T.encoded_batch(lambda: world, seed=0, step=3, size=4)["attributes"]
    pixels = torch.stack([torch.from_numpy(dw.draw(**a)) for a in batch["attributes"]]).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(batch["latents"], parts["movq"].encode(pixels / 127.5 - 1).latents)
        torch.testing.assert_close(batch["embeds"], T.image_embeds(parts, pixels.float()))
    pool = T.guided_samples(parts, seed=5, per_caption=2)
    for a, guided in zip(batch["attributes"], batch["guided"]):
        samples = pool[:, T.all_captions().index(dw.caption(a))]
        assert (samples == guided).all(1).any()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    def clip_stage():
        return next(T.stages(T.build(seed=0, width=8), seed=0, batch_size=4))

    straight = clip_stage()
    T.train(straight, tmp_path / "a", steps=4)
    first = clip_stage()
    T.train(first, tmp_path / "b", steps=2, schedule=4)  # as if stopped halfway
    second = clip_stage()  # a fresh process: rebuilt model, state from the checkpoint
    losses = T.train(second, tmp_path / "b", steps=4)
    assert len(losses) == 2
    assert torch.load(tmp_path / "b" / "clip.pt", weights_only=True)["step"] == 4
    for k, v in state(straight.model).items():
        torch.testing.assert_close(second.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert T.train(clip_stage(), tmp_path / "b", steps=4) == []  # finished: nothing left to do


def test_train_all_writes_a_pipeline_that_draws(tmp_path):
    from cascade import KandinskyV22CombinedPipeline

    from cascade import KandinskyV22InpaintCombinedPipeline

    T.train_all(tmp_path, steps=dict(clip=2, movq=1, prior=2, decoder=2, inpaint=2), batch_size=2, width=8,
                dtype=torch.float16, images=4)
    run = dict(height=dw.SIZE, width=dw.SIZE, num_inference_steps=2, prior_num_inference_steps=2)
    pipe = KandinskyV22CombinedPipeline.from_pretrained(tmp_path / "demo", torch_dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and pipe.prior_text_encoder.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    image = pipe("a red circle on a blue background", **run, generator=generator).images[0]
    assert image.size == (dw.SIZE, dw.SIZE)
    inpaint = KandinskyV22InpaintCombinedPipeline.from_pretrained(tmp_path / "demo-inpaint",
                                                                  torch_dtype=torch.float32)
    mask = torch.zeros(dw.SIZE, dw.SIZE)
    mask[8:40, 8:40] = 1
    image = inpaint("a red circle on a blue background", image, mask, **run).images[0]
    assert image.size == (dw.SIZE, dw.SIZE)
