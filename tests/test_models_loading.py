"""Loading what a careless or hostile folder holds: every file must be a regular file inside the model
folder (a Hub snapshot: inside its repository), configs are bounded and typed, weights have the model's
dtypes; each failure names the file and what is wrong, at once."""
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade.models import VQModel
from cascade.schedulers import DDPMScheduler

TINY = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2, norm_num_groups=4,
            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, num_vq_embeddings=8, vq_embed_dim=4)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    VQModel(**TINY).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def fails_fast(error, words, fn, *args):
    start = time.perf_counter()
    with pytest.raises(error, match=words):
        fn(*args)
    assert time.perf_counter() - start < 1.0


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_the_folder_loads(folder):
    assert VQModel.from_pretrained(folder).config.latent_channels == 4


def test_a_config_linked_to_dev_zero_fails_at_once(folder):
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    fails_fast(ValueError, "config.json: links to /dev/zero, outside the model folder", VQModel.from_pretrained,
               folder)


def test_a_device_or_folder_inside_the_model_folder_is_not_a_config(folder):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    fails_fast(ValueError, "config.json: not a regular file", VQModel.from_pretrained, folder)


def test_an_oversized_config_is_refused_unread(folder):
    with open(folder / "config.json", "r+b") as f:
        f.truncate(2**40)  # sparse: a terabyte that takes no disk
    fails_fast(ValueError, "config.json: 1099511627776 bytes", VQModel.from_pretrained, folder)


def test_a_config_that_is_not_an_object_is_named(folder):
    (folder / "config.json").write_text("[1, 2]")
    fails_fast(ValueError, "config.json: expected a JSON object", VQModel.from_pretrained, folder)


def test_a_config_linked_outside_the_folder_is_refused(folder, tmp_path):
    (tmp_path / "elsewhere.json").write_text((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(tmp_path / "elsewhere.json")
    fails_fast(ValueError, "elsewhere.json, outside the model folder", VQModel.from_pretrained, folder)


@pytest.mark.parametrize("shard", ["../../outside/x.safetensors", "/etc/passwd"])
def test_shards_outside_the_folder_are_refused(folder, tmp_path, shard):
    (tmp_path / "outside").mkdir()
    os.replace(folder / WEIGHTS, tmp_path / "outside" / "x.safetensors")
    index = {"metadata": {}, "weight_map": {k: shard for k in load_file(tmp_path / "outside" / "x.safetensors")}}
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    fails_fast(ValueError, "outside the model folder", VQModel.from_pretrained, folder)


def test_weights_linked_to_a_device_are_refused(folder):
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to("/dev/zero")
    fails_fast(ValueError, "outside the model folder", VQModel.from_pretrained, folder)


def test_a_hub_snapshot_whose_files_link_into_blobs_loads(folder, tmp_path):
    repo = tmp_path / "hub" / "models--someone--tiny-vq"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", WEIGHTS):
        os.replace(folder / name, repo / "blobs" / name.replace(".", "_"))
        (snapshot / name).symlink_to(os.path.relpath(repo / "blobs" / name.replace(".", "_"), snapshot))
    assert VQModel.from_pretrained(snapshot).config.num_vq_embeddings == 8


def test_integer_tensors_in_the_weights_are_named(folder):
    state = load_file(folder / WEIGHTS)
    state["quant_conv.weight"] = state["quant_conv.weight"].to(torch.int64)
    save_file(state, folder / WEIGHTS)
    fails_fast(ValueError, "quant_conv.weight is torch.int64, the model needs float32, float16 or bfloat16",
               VQModel.from_pretrained, folder)


@pytest.mark.parametrize("key,value", [("latent_channels", "4"), ("block_out_channels", ["8", "16"]),
                                       ("norm_num_groups", True), ("scaling_factor", "0.2")])
def test_a_value_of_the_wrong_type_is_named(folder, key, value):
    edit_config(folder, **{key: value})
    fails_fast(ValueError, f"config.json: {key}=.* does not have the option's type", VQModel.from_pretrained,
               folder)


def test_a_schedule_of_zero_timesteps_is_named(tmp_path):
    DDPMScheduler().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**config, "num_train_timesteps": 0}))
    fails_fast(ValueError, "scheduler_config.json: num_train_timesteps must be at least 1, got 0",
               DDPMScheduler.from_pretrained, tmp_path)


def test_channels_last_loads_the_same_values_in_the_other_layout(folder):
    plain = VQModel.from_pretrained(folder)
    last = VQModel.from_pretrained(folder, memory_format=torch.channels_last)
    convs = [k for k, v in plain.state_dict().items() if v.ndim == 4 and v.shape[-1] > 1]
    assert len(convs) > 10
    for k, v in last.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k])
        assert v.is_contiguous(memory_format=torch.channels_last) == (v.ndim == 4), k
    assert not plain.state_dict()[convs[0]].is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (m.decode(z).sample for m in (plain, last))
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert (a - b).abs().max() < 1e-5


def test_weights_converted_at_load_equal_the_stored_ones_converted(folder):
    """Converted weights are read from the file, not copied from its mapping: the same values."""
    plain = VQModel.from_pretrained(folder)
    half = VQModel.from_pretrained(folder, torch_dtype=torch.float16)
    for k, v in half.state_dict().items():
        assert v.dtype == torch.float16 and torch.equal(v, plain.state_dict()[k].half())
