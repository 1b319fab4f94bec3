import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


def as_array(x):
    """Images or embeddings of either library -> one float64 numpy array."""
    if isinstance(x, (list, tuple)) and x and hasattr(x[0], "convert"):
        return np.stack([np.asarray(i, dtype=np.float64) / 255.0 for i in x])
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(ours, ref, atol=1e-4):
    a, b = as_array(ours), as_array(ref)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"
    return err


def load(lib, name, folder, **kw):
    """`name` from library `lib` (cascade or the reference) loaded from `folder`, progress bars off."""
    pipe = getattr(lib, name).from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def kandinsky_root(tmp_path_factory):
    import tiny

    root = tmp_path_factory.mktemp("kandinsky")
    tiny.kandinsky_prior(root)
    for kind in ("text2img", "inpaint", "controlnet"):
        tiny.kandinsky_decoder(root, kind)
    for kind in ("text2img", "img2img", "inpaint"):
        tiny.kandinsky_combined(root, kind)
    return root


@pytest.fixture(scope="session")
def unclip_root(tmp_path_factory):
    from test_unclip import build

    root = tmp_path_factory.mktemp("unclip")
    build(root)
    return root


@pytest.fixture(scope="session")
def upscaler_folder(tmp_path_factory):
    from test_latent_upscale import reference_pipeline

    root = tmp_path_factory.mktemp("upscaler")
    reference_pipeline(root).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="session")
def wuerstchen_root(tmp_path_factory):
    from test_wuerstchen import build

    root = tmp_path_factory.mktemp("wuerstchen")
    return build(root)
