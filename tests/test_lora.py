"""LoRA on the Würstchen prior pipeline: the same file, written by either library, loaded in both."""
import pytest
import torch
from conftest import assert_close, load
from test_wuerstchen import EMBED_ATOL, reference_models, root  # noqa: F401 (root: the tiny pipelines)

import cascade
from cascade import lora

peft = pytest.importorskip("peft")
CALL = dict(prompt=["a cat", "the dog"], num_inference_steps=3, height=128, width=128, guidance_scale=4.0)
PRIOR_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "kv_mapper.1", "mapper", "channelwise.0",
                 "cond_mapper.2"]


@pytest.fixture(scope="module")
def lora_dir(root, tmp_path_factory):
    """A LoRA for the tiny prior pipeline's prior and text encoder, saved by the reference."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    reference_models()
    pipe = load(diffusers, "WuerstchenPriorPipeline", root / "prior")
    # Rank 4, alpha 8 (scaling 2), one module at rank 2: the metadata's patterns are exercised too.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PRIOR_TARGETS, rank_pattern={"^cond_mapper.2": 2})
    pipe.prior.add_adapter(config)
    text_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"])
    pipe.text_encoder.add_adapter(text_config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # lora_B starts at zero
        for name, p in [*pipe.prior.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp("lora")
    pipe.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.prior),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        # The reference reads a file with metadata for one component only as an empty config for the other.
        unet_lora_adapter_metadata=config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return folder


def pipes(folder, lora_file, name="WuerstchenPriorPipeline"):
    """Both libraries' pipelines from `folder`, the LoRA loaded in the (combined pipeline's) prior."""
    import diffusers

    reference_models()
    pair = [load(lib, name, folder) for lib in (cascade, diffusers)]
    for p in pair:
        getattr(p, "prior_pipe", p).load_lora_weights(lora_file)
    return pair


def embeds(pair):
    return [p(**CALL, generator=torch.Generator().manual_seed(0)).image_embeddings for p in pair]


def test_reference_file_scales_and_fusing(root, lora_dir):
    ours, ref = pipes(root / "prior", lora_dir)
    plain = load(cascade, "WuerstchenPriorPipeline", root / "prior")
    before = {k: v.clone() for k, v in ours.prior.state_dict().items()}
    assert ours.get_list_adapters() == {"prior": ["default_0"], "text_encoder": ["default_0"]}
    assert_close(*embeds((ours, ref)), EMBED_ATOL)
    assert not torch.allclose(embeds((ours,))[0], embeds((plain,))[0], atol=0.1)  # the LoRA matters
    for p in (ours, ref):
        p.set_adapters("default_0", 0.5)
    assert_close(*embeds((ours, ref)), EMBED_ATOL)
    for p in (ours, ref):
        p.fuse_lora(components=["prior", "text_encoder"], lora_scale=0.7)
    assert_close(*embeds((ours, ref)), EMBED_ATOL)
    for p in (ours, ref):
        p.unfuse_lora(components=["prior", "text_encoder"])
    assert all(torch.equal(before[k], v) for k, v in ours.prior.state_dict().items())  # restored exactly
    # Both keep the fused scale on the unfused adapter; the reference subtracts the fused delta back, which
    # leaves ~1e-7 in its weights (4.4e-4 in the embeddings after the first step's amplification).
    assert_close(*embeds((ours, ref)), max(EMBED_ATOL, 1e-3))
    ours.unload_lora_weights()
    assert ours.get_list_adapters() == {} and torch.equal(embeds((ours,))[0], embeds((plain,))[0])


def test_file_saved_by_cascade_loads_in_reference(root, lora_dir, tmp_path):
    ours, _ = pipes(root / "prior", lora_dir)
    type(ours).save_lora_weights(
        tmp_path, unet_lora_layers=lora.adapter_state_dict(ours.prior),
        text_encoder_lora_layers=lora.adapter_state_dict(ours.text_encoder),
        unet_lora_adapter_metadata=lora.adapter_metadata(ours.prior),
        text_encoder_lora_adapter_metadata=lora.adapter_metadata(ours.text_encoder))
    again, ref = pipes(root / "prior", tmp_path / lora.LORA_WEIGHT_NAME_SAFE)
    expected = embeds((ours,))[0]
    assert torch.equal(embeds((again,))[0], expected)
    assert_close(embeds((ref,))[0], expected, EMBED_ATOL)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_two_adapters(root, lora_dir):
    """The adapter loaded last is the active one; set_adapters combines them, per component too."""
    pair = pipes(root / "prior", lora_dir)
    for p in pair:
        p.load_lora_weights(lora_dir, adapter_name="b")
    assert_close(*embeds(pair), EMBED_ATOL)
    for names, weights in ((["default_0", "b"], [0.3, 0.6]), (["b"], {"prior": 0.5})):
        for p in pair:
            p.set_adapters(names, weights)
        assert_close(*embeds(pair), EMBED_ATOL)


def test_combined_pipeline_prior(root, lora_dir):
    pair = pipes(root / "combined", lora_dir, "WuerstchenCombinedPipeline")
    call = dict(prompt="a cat", output_type="np", prior_num_inference_steps=3, num_inference_steps=2,
                height=128, width=128)
    ours, ref = [p(**call, generator=torch.Generator().manual_seed(0)).images for p in pair]
    assert_close(ours, ref)
    pair[0].prior_pipe.unload_lora_weights()
    assert not torch.allclose(torch.as_tensor(ours), torch.as_tensor(pair[0](**call).images), atol=0.01)


def test_bad_files(root, lora_dir):
    ours = load(cascade, "WuerstchenPriorPipeline", root / "prior")
    with pytest.raises(ValueError, match="component"):
        ours.load_lora_weights({"unet.x.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="Linear"):
        ours.load_lora_weights({"prior.blocks.0.lora_A.weight": torch.zeros(2, 2),
                                "prior.blocks.0.lora_B.weight": torch.zeros(2, 2)})
    ours.load_lora_weights(lora_dir, adapter_name="x")
    with pytest.raises(ValueError, match="in use"):
        ours.load_lora_weights(lora_dir, adapter_name="x")
    with pytest.raises(ValueError, match="unknown adapters"):
        ours.set_adapters("y")
