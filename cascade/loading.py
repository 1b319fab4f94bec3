"""Weights in and out: safetensors first, `.bin` only with `weights_only=True`; meta-device builds."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from .attention_options import AttentionOptions
from .config import Configurable, inside, read_json, regular_file, write_json

WEIGHTS = "diffusion_pytorch_model"
BUILTIN = Path(__file__).parent / "weights"  # checkpoints shipped in the package (float16 files)
DEMO_PARTS = ("demo", "demo-prior", "demo-inpaint")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def builtin(name_or_path, part: str | None = None) -> Path | None:
    """The folder of a checkpoint shipped in the package that a name (or its path) means, else None. The
    demo is one cascade in three folders: "demo" asked for by a pipeline that runs another `part` of it (the
    prior alone, the inpainting decoder) gives that part. A local folder of the same name wins."""
    path = Path(name_or_path)
    if str(name_or_path) in DEMO_PARTS and not path.exists():
        path = BUILTIN / str(name_or_path)
    elif path.parent.resolve() != BUILTIN.resolve() or path.name not in DEMO_PARTS:
        return None
    return path.parent / part if part and path.name == "demo" else path


def with_variant(name: str, variant: str | None) -> str:
    """`model.safetensors` -> `model.fp16.safetensors`, as the reference names variant files."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def resolve(path_or_repo: str | os.PathLike, subfolder: str | None = None, patterns=None, **hub) -> Path:
    """A local folder as is, a built-in name its folder in the package, otherwise a Hub repo id downloaded
    (or found in the cache) by huggingface_hub."""
    path = Path(path_or_repo)
    if not path.is_dir() and (own := builtin(path_or_repo)) is not None:
        path = own
    elif not path.is_dir():
        from huggingface_hub import snapshot_download

        hub = {k: v for k, v in hub.items() if v is not None}
        if hub.pop("local_files_only", False) or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
            hub["local_files_only"] = True
        path = Path(snapshot_download(str(path_or_repo), allow_patterns=patterns, **hub))
    path = path / subfolder if subfolder else path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    return path


def weight_files(folder: Path, variant: str | None = None, stem: str = WEIGHTS) -> list[Path]:
    """The files holding a model's weights: one file or the shards an index names; safetensors first."""
    for ext in ("safetensors", "bin"):
        single = folder / with_variant(f"{stem}.{ext}", variant)
        if single.exists():
            return [checked_weights(single, folder)]
        index = folder / with_variant(f"{stem}.{ext}.index.json", variant)
        if index.exists():
            shards = read_json(index).get("weight_map")
            if not isinstance(shards, dict) or not all(isinstance(s, str) for s in shards.values()):
                raise ValueError(f"{index}: expected a weight_map of tensor names to file names")
            return [checked_weights(folder / s, folder) for s in sorted(set(shards.values()))]
    wanted = with_variant(f"{stem}.safetensors", variant)
    raise FileNotFoundError(f"{folder}: no weights found (looked for {wanted} and .bin, sharded or not)")


def checked_weights(path: Path, folder: Path) -> Path:
    """A weights file (or shard) that stays inside the model folder and is a regular file."""
    path = inside(path, folder)
    regular_file(path)
    return path


def read_state_dict(files: list[Path], dtype: torch.dtype | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, torch.Tensor]:
    """The files' tensors, mapped rather than read where they are used as stored; floating-point ones in
    `dtype` when given, 4-D ones (convolution weights) in `memory_format`."""
    state = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a truncated or foreign file: say which one
            raise ValueError(f"{f}: cannot read weights ({type(e).__name__}: {e})") from None
        odd = next((k for k, v in part.items() if not isinstance(v, torch.Tensor)), None)
        if odd is not None:
            raise ValueError(f"{f}: {odd!r} is a {type(part[odd]).__name__}, not a tensor")
        changed = {k for k, v in part.items() if changes(v, dtype, memory_format)}
        # A copy made from the mapping would leave the mapped pages resident beside it, holding those weights
        # twice for as long as the file stays mapped: what changes is read from the file instead.
        fresh = (read_safetensors(f, changed, part) if f.suffix == ".safetensors"
                 else ((k, part[k]) for k in changed))
        state.update(part)
        for k, t in fresh:
            to_dtype, to_format = wanted(t, dtype, memory_format)
            state[k] = t.to(dtype=to_dtype, memory_format=to_format)
    return state


def wanted(t: torch.Tensor, dtype: torch.dtype | None,
           memory_format: torch.memory_format) -> tuple[torch.dtype, torch.memory_format]:
    """The dtype and layout a model asks of a stored tensor: floating-point ones in `dtype` when given, 4-D
    ones (convolution weights) in `memory_format`, the rest as stored."""
    return (dtype if dtype is not None and t.is_floating_point() else t.dtype,
            memory_format if t.ndim == 4 else torch.preserve_format)


def changes(t: torch.Tensor, dtype: torch.dtype | None, memory_format: torch.memory_format) -> bool:
    """Whether `t` needs converting to what `wanted` says, found without reading its data."""
    dtype, memory_format = wanted(t, dtype, memory_format)
    return t.dtype != dtype or (memory_format != torch.preserve_format
                                and not t.is_contiguous(memory_format=memory_format))


def read_safetensors(path: Path, keys: set[str], like: dict[str, torch.Tensor]):
    """Tensors `keys` of a safetensors file (an 8-byte header length, a JSON header of byte offsets, then the
    data), shaped and typed as `like`'s, each read into one scratch buffer that the next one overwrites:
    convert each before taking the next (a fresh allocation per tensor left the heap fragmented, 1 GB more
    resident on the real-size decoder)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        size_of = {k: like[k].numel() * like[k].element_size() for k in keys}
        scratch = torch.empty(max(size_of.values(), default=0), dtype=torch.uint8)
        for k in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):  # in file order
            (start, end), size = header[k]["data_offsets"], size_of[k]
            f.seek(8 + n + start)
            if end - start != size or f.readinto(scratch[:size].numpy()) != size:
                raise ValueError(f"{path}: {k} is cut short")
            yield k, scratch[:size].view(like[k].dtype).view(like[k].shape)


class no_init(TorchFunctionMode):
    """Inside, nn.init's functions leave tensors as they are: a load replaces every value they would compute,
    and some of them on the meta device cost seconds (`normal_` there imports torch._dynamo)."""

    skipped = frozenset(getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and n[0] != "_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.skipped:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names the file and the offending keys, then checks nothing is left on meta."""
    state = model.rename_legacy_keys(state) if hasattr(model, "rename_legacy_keys") else state
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match {type(model).__name__} "
                         f"(missing keys: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                         f"unexpected keys: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k,
             v in state.items() if v.shape != expected[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"{source}: {k} has shape {got}, the config asks for {want}")
    # Integer or double tensors where the model holds float weights would fail (or mix dtypes) deep inside it.
    odd = [(k, v.dtype, expected[k].dtype) for k, v in state.items() if v.dtype != expected[k].dtype and (
        v.dtype not in WEIGHT_DTYPES or not expected[k].is_floating_point())]
    if odd:
        k, got, want = odd[0]
        want = "float32, float16 or bfloat16" if want.is_floating_point else want
        raise ValueError(f"{source}: {k} is {got}, the model needs {want}")
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{type(model).__name__}: {leftover[0]} was never loaded")


class ModelMixin(Configurable, AttentionOptions, nn.Module):
    """Reference-compatible model: config dataclass, `from_pretrained`, `save_pretrained`."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(cls, path_or_repo, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, variant: str | None = None, cache_dir=None,
                        revision=None, local_files_only=None, token=None, **kwargs):
        if (own := builtin(path_or_repo)) is not None:
            path_or_repo, torch_dtype = own, torch_dtype or torch.float32  # float16 only to ship small
        pattern = f"{subfolder}/*" if subfolder else None
        folder = resolve(path_or_repo, subfolder, pattern and [pattern], cache_dir=cache_dir,
                         revision=revision, local_files_only=local_files_only, token=token)
        return cls.load(folder, torch_dtype, variant, **kwargs)

    @classmethod
    def load(cls, folder: Path, torch_dtype=None, variant=None, memory_format=torch.contiguous_format,
             **overrides):
        """`memory_format=torch.channels_last` stores the convolution weights channels-last, the layout the
        convolutions then compute in (a faster CPU path that rounds differently, README: Performance)."""
        config = cls.config_class.from_dict(read_json(folder / cls.config_name),
                                            str(folder / cls.config_name), **overrides)
        with torch.device("meta"), no_init():
            model = cls(config)
        files = weight_files(folder, variant)
        load_into(model, read_state_dict(files, torch_dtype, memory_format), str(files[0]))
        return model.eval()

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None, **_):
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / self.config_name, self.config_dict())
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if safe_serialization:
            save_file(state, str(folder / with_variant(f"{WEIGHTS}.safetensors", variant)),
                      metadata={"format": "pt"})
        else:
            torch.save(state, folder / with_variant(f"{WEIGHTS}.bin", variant))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

