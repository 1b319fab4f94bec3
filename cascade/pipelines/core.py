"""The pipeline base and the stages every pipeline composes: loading, the one denoising loop, guidance,
latents, callbacks, image pre/post-processing."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import PIL.Image
import torch

from ..config import DIFFUSERS_VERSION, read_json, write_json
from ..deepcache import SUPPORTED as DEEPCACHE_PIPELINES
from ..deepcache import using as deepcache_using
from ..loading import builtin, resolve
from ..schedulers.base import randn_tensor
from .checks import finite_stage
from .offload import OffloadMixin
from .vae import VaeOptions

DEEPCACHE_MISSING = f"UNet2DConditionModel decoder for DeepCache; it runs on {DEEPCACHE_PIPELINES}"

# The transformers classes a model_index.json may name (never imported by name otherwise), and what reads
# names that other transformers versions write.
TRANSFORMERS_CLASSES = {"CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection",
                        "CLIPTokenizer", "CLIPTokenizerFast", "CLIPImageProcessor", "CLIPImageProcessorPil",
                        "CLIPFeatureExtractor"}
TRANSFORMERS_ALIASES = {"CLIPTokenizerFast": "CLIPTokenizer", "CLIPImageProcessorPil": "CLIPImageProcessor",
                        "CLIPFeatureExtractor": "CLIPImageProcessor"}


def own_classes() -> dict[str, type]:
    """Our model and scheduler classes by the names checkpoints record them under."""
    from .. import models, schedulers

    return {n: getattr(m, n) for m in (models, schedulers) for n in getattr(m, "__all__", ())}


class Output:
    """Reference-style output: attribute, key and index access, `to_tuple()`; iterating gives the keys,
    as the reference's ordered-dict outputs do."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())

    def __iter__(self):
        return iter(self.keys())


@dataclass
class ImagePipelineOutput(Output):
    images: Any


# The sampling loop, guidance and latents live in sampling.py; pipelines import them from here too.
from .sampling import (cfg, denoise, guided, noised_start, prepare_latents,  # noqa: E402,F401
                       start_latents)


def tokenize(tokenizer, texts):
    """Token ids and attention mask, padded and truncated to the tokenizer's length, as every CLIP stage wants."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def encode_image(processor, image_encoder, image) -> torch.Tensor:
    """CLIP image embeddings of PIL images (through the processor) or of already prepared pixel tensors."""
    if not isinstance(image, torch.Tensor):
        image = processor(images=image, return_tensors="pt").pixel_values
    p = next(image_encoder.parameters())
    return image_encoder(image.to(p.device, p.dtype)).image_embeds


def encode_text(tokenizer, text_encoder, prompt, negative_prompt, n, guide) -> dict:
    """CLIP text embeddings, last hidden states and padding mask per prompt, [negative, positive] to guide."""

    def encode(texts):
        tokens = tokenize(tokenizer, texts)
        out = text_encoder(tokens.input_ids.to(text_encoder.device))
        mask = tokens.attention_mask.bool().to(text_encoder.device)
        return [v.repeat_interleave(n, 0) for v in (out.text_embeds, out.last_hidden_state, mask)]

    parts = encode(prompt)
    if guide:
        if negative_prompt is not None and len(negative_prompt) != len(prompt):
            raise ValueError(f"negative_prompt: got {len(negative_prompt)} prompts, prompt has {len(prompt)}")
        negative = encode(negative_prompt if negative_prompt is not None else [""] * len(prompt))
        parts = [torch.cat([neg, pos]) for neg, pos in zip(negative, parts)]
    return dict(zip(("prompt_embeds", "text_encoder_hidden_states", "text_mask"), parts))


# --------------------------------------------------------------------------------------------- images

def to_tensor_batch(image, height=None, width=None, resample=PIL.Image.BICUBIC, bytes_scale=False) -> torch.Tensor:
    """PIL / numpy HWC in [0, 1] / torch CHW (in [0, 1], or [-1, 1]) -> NCHW in [-1, 1].

    `bytes_scale`: numpy images hold 0..255 and bytes map to [-1, 1] as x / 127.5 - 1, as the reference's
    inpainting does (its float rounding differs from 2 * x / 255 - 1)."""
    images = image if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("image: got an empty list")
    if isinstance(images[0], PIL.Image.Image):
        size = (width or images[0].width, height or images[0].height)
        images = [np.asarray(i.resize(size, resample=resample, reducing_gap=1).convert("RGB")) for i in images]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0 if bytes_scale else 2.0 * (x / 255.0) - 1.0
    elif isinstance(images[0], np.ndarray):
        x = torch.from_numpy(np.concatenate([i if i.ndim == 4 else i[None] for i in images])).permute(0, 3, 1, 2)
        if bytes_scale:
            return x.float() / 127.5 - 1.0
    elif isinstance(images[0], torch.Tensor):
        x = torch.cat([i if i.ndim == 4 else i[None] for i in images])
    else:
        raise TypeError(f"image: expected PIL images, numpy arrays or tensors, got {type(images[0]).__name__}")
    if height and width and tuple(x.shape[-2:]) != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width))
    # Tensors already in [-1, 1] are taken as they are, as the reference does.
    return x if x.min() < 0 else 2.0 * x - 1.0


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    images = (images * 255).round().astype("uint8")
    return [PIL.Image.fromarray(i.squeeze(-1), mode="L") if i.shape[-1] == 1 else PIL.Image.fromarray(i)
            for i in images]


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type, allowed=OUTPUT_TYPES):
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {allowed}, got {output_type!r}")


def postprocess(image: torch.Tensor, output_type: str, unit_pt: bool = True):
    """Decoder output in [-1, 1] -> PIL list, NHWC numpy or NCHW tensor in [0, 1] (raw if not unit_pt)."""
    finite_stage("decoder", image)  # NaN would become black pixels
    if output_type == "pt" and not unit_pt:
        return image
    image = (image * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return numpy_to_pil(image) if output_type == "pil" else image


# --------------------------------------------------------------------------------------------- the base

class DiffusionPipeline(VaeOptions, OffloadMixin):
    """Components by name, loading and saving in the reference's layout, device, progress and callbacks."""

    components_order: ClassVar[tuple[str, ...]] = ()
    demo_part: ClassVar[str | None] = None  # which folder of the built-in demo cascade runs this pipeline
    config_values: ClassVar[dict[str, Any]] = {}  # plain values model_index.json carries
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]
    _optional_components: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args, **kwargs):
        names = self.components_order + tuple(self.config_values)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} components, got {len(args)}")
        given = {**dict(zip(names, args)), **kwargs}
        unknown = set(given) - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown component(s) {sorted(unknown)}; expected {names}")
        missing = [n for n in self.components_order if n not in given and n not in self._optional_components]
        if missing:
            raise TypeError(f"{type(self).__name__}: missing component(s) {missing}")
        for name in self.components_order:
            setattr(self, name, given.get(name))
        for name, default in self.config_values.items():
            setattr(self, name, given.get(name, default))
        self._progress_config: dict[str, Any] = {}

    @property
    def components(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.components_order + tuple(self.config_values)}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {n: m for n in self.components_order if isinstance(m := getattr(self, n), torch.nn.Module)}

    # --- loading and saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, variant=None, cache_dir=None,
                        revision=None, local_files_only=None, token=None,
                        memory_format=torch.contiguous_format, **kwargs):
        """Components not given in `kwargs` load from the folder or Hub repo; `memory_format` is that of the
        convolution weights of the folder's own models (ModelMixin.load)."""
        if (own := builtin(pretrained_model_name_or_path, cls.demo_part)) is not None:
            if cls.demo_part is None:
                raise ValueError(f"{pretrained_model_name_or_path}: the demo is a Kandinsky 2.2 cascade; "
                                 f"{cls.__name__} cannot run it")
            pretrained_model_name_or_path, torch_dtype = own, torch_dtype or torch.float32
        folder = download(pretrained_model_name_or_path, variant, cache_dir=cache_dir, revision=revision,
                          local_files_only=local_files_only, token=token)
        index = read_json(folder / "model_index.json")
        hub = dict(cache_dir=cache_dir, revision=revision, local_files_only=local_files_only, token=token)
        parts = cls.missing_parts(folder, index, kwargs, torch_dtype, variant, hub)
        for name in cls.components_order:
            if name not in kwargs and name not in parts:
                parts[name] = load_component(folder, name, index, cls, torch_dtype, variant, memory_format)
        for name in cls.config_values:
            if name in index and name not in kwargs:
                parts[name] = index[name]
        return cls(**parts, **kwargs)

    @classmethod
    def missing_parts(cls, folder, index, given, torch_dtype, variant, hub) -> dict[str, Any]:
        """Components to take from elsewhere when the folder lacks them (combined pipelines: the prior)."""
        return {}

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None, **_):
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}
        for name in self.components_order:
            part = getattr(self, name)
            if part is None:
                index[name] = [None, None]
                continue
            is_ours = type(part).__module__.startswith("cascade.")
            index[name] = ["diffusers" if is_ours else "transformers", type(part).__name__]
            kw = {"safe_serialization": safe_serialization, "variant": variant} if hasattr(part, "parameters") else {}
            part.save_pretrained(folder / name, **kw)
        index.update({n: getattr(self, n) for n in self.config_values})
        write_json(folder / "model_index.json", index)

    # --- device and dtype
    @property
    def device(self) -> torch.device:
        """Where inputs and latents live: the offload target when offloading, else the models' device."""
        if self._offload_device is not None:
            return self._offload_device
        for m in self.modules().values():
            return next(m.parameters()).device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for m in self.modules().values():
            return next(m.parameters()).dtype
        return torch.float32

    _execution_device = device

    def to(self, *args, **kwargs):
        for m in self.modules().values():
            m.to(*args, **kwargs)
        return self

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **overrides):
        """This pipeline built from another's components (shared, not copied), any of them replaced."""
        parts = {**pipeline.components, **overrides}
        missing = [n for n in cls.components_order if n not in parts and n not in cls._optional_components]
        if missing:
            raise ValueError(f"{cls.__name__}.from_pipe: {type(pipeline).__name__} has no {missing}; pass them")
        names = cls.components_order + tuple(cls.config_values)
        return pipeline.derive(cls, **{n: parts[n] for n in names if n in parts})

    def derive(self, cls, **components):
        """Another pipeline over (some of) these components, keeping progress and offload settings."""
        pipe = cls(**components)
        pipe._progress_config = dict(self._progress_config)
        pipe._offload_device, pipe._offload_active = self._offload_device, self._offload_active
        return pipe

    # --- progress and callbacks
    def set_progress_bar_config(self, **kwargs):
        self._progress_config = kwargs

    def progress_bar(self, iterable):
        from tqdm.auto import tqdm

        return tqdm(iterable, **self._progress_config)

    def callbacks(self, state: dict, on_step_end=None, tensor_inputs=("latents",), legacy=None, before=None):
        """One hook for the loop: model-side updates (`before`), then the user's callbacks, in the
        reference's order; the user's callback may replace any tensor of `state`."""
        legacy = dict(legacy or {})
        callback, steps = legacy.pop("callback", None), legacy.pop("callback_steps", None) or 1
        if legacy:
            raise TypeError(f"{type(self).__name__}.__call__ got unexpected argument(s) {sorted(legacy)}")
        bad = [k for k in tensor_inputs or () if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} not in {self._callback_tensor_inputs}")
        if on_step_end is None and callback is None and before is None:
            return None

        def on_step(i, t, x):
            state["latents"] = before(i, t, x) if before is not None else x
            if on_step_end is not None:
                state.update(on_step_end(self, i, t, {k: state[k] for k in tensor_inputs}) or {})
            if callback is not None and i % steps == 0:
                callback(i, t, state["latents"])
            return state["latents"]

        return on_step

    # --- attention and FreeU switches of the models (cascade/attention_options.py, UNet2DConditionModel)
    def models_with(self, attribute: str, missing: str | None = None) -> list:
        """The component models that have `attribute`; with `missing`, having none is a ValueError saying
        what the pipeline lacks."""
        models = [m for m in self.modules().values() if hasattr(m, attribute)]
        if not models and missing:
            raise ValueError(f"{type(self).__name__} has no {missing}")
        return models

    def for_models(self, method: str, *args, missing: str | None = None) -> list:
        """Call `method` on every component model that has it (see models_with); the models called."""
        models = self.models_with(method, missing)
        for m in models:
            getattr(m, method)(*args)
        return models

    def enable_attention_slicing(self, slice_size="auto"):
        self.for_models("set_attention_slice", slice_size)

    def disable_attention_slicing(self):
        self.for_models("set_attention_slice", None)

    def enable_xformers_memory_efficient_attention(self, attention_op=None):
        self.for_models("set_use_memory_efficient_attention_xformers", True, attention_op)

    def disable_xformers_memory_efficient_attention(self):
        self.for_models("set_use_memory_efficient_attention_xformers", False)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float):
        self.for_models("enable_freeu", s1, s2, b1, b2, missing="UNet2DConditionModel to apply FreeU to")

    def disable_freeu(self):
        self.for_models("disable_freeu")

    # --- DeepCache step caching (cascade/deepcache.py): a setting on the decoder UNet, the cache per call
    def enable_deepcache(self, cache_interval: int = 3, cache_branch_id: int = 0):
        """Run the whole decoder UNet every `cache_interval` of its forward calls in a pipeline call (a
        second-order sampler makes two a step), in between only its levels 0 to `cache_branch_id`, on the
        deep features of the last full one (arXiv 2312.00858). The setting is the UNet's, shared by every
        pipeline holding it; `deepcache(...)` is one thread's own."""
        self.for_models("enable_deepcache", cache_interval, cache_branch_id, missing=DEEPCACHE_MISSING)

    def disable_deepcache(self):
        """Back to the plain UNet, bit for bit; a no-op where DeepCache does not apply."""
        self.for_models("disable_deepcache")

    def deepcache(self, cache_interval: int | None = 3, cache_branch_id: int = 0):
        """A `with` block in which the calls this thread makes use these settings (None: off) instead of
        enable_deepcache's; other threads' calls on this pipeline are untouched (a request's own option)."""
        if cache_interval is None:  # off, which any pipeline can be
            return deepcache_using(None)
        unets = self.models_with("deepcache_settings", DEEPCACHE_MISSING)
        return deepcache_using([u.deepcache_settings(cache_interval, cache_branch_id) for u in unets][0])


def download(path_or_repo, variant=None, **hub) -> Path:
    """A pipeline folder; from the Hub only the files a load reads (safetensors, else .bin; the variant)."""
    if Path(path_or_repo).is_dir():
        return Path(path_or_repo)
    text = ["*.json", "*.txt", "README.md", "*.model"]
    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    folder = resolve(path_or_repo, None, text + [weights], **hub)
    if not list(folder.rglob("*.safetensors")):
        folder = resolve(path_or_repo, None, text + ["*.bin"], **hub)
    return folder


def load_component(folder: Path, name: str, index: dict, pipeline_cls, torch_dtype, variant,
                   memory_format=torch.contiguous_format):
    entry = index.get(name)
    if entry is None:
        raise ValueError(f"{folder / 'model_index.json'}: component {name!r} is missing; "
                         f"{pipeline_cls.__name__} needs {pipeline_cls.components_order}")
    library, class_name = entry
    if class_name is None:
        return None
    if library == "transformers":
        import transformers

        if class_name not in TRANSFORMERS_CLASSES:
            raise ValueError(f"{folder / 'model_index.json'}: {name} is a transformers {class_name}, not supported")
        cls = getattr(transformers, class_name, None) or getattr(transformers, TRANSFORMERS_ALIASES[class_name])
        kw = {"dtype": torch_dtype} if torch_dtype is not None and "Model" in class_name else {}
        return cls.from_pretrained(folder / name, **kw)
    ours = own_classes()
    if class_name not in ours:
        raise ValueError(f"{folder / 'model_index.json'}: {name} is a {library} {class_name}, which cascade "
                         f"does not implement")
    cls = ours[class_name]
    if hasattr(cls, "load"):
        return cls.load(folder / name, torch_dtype, variant, memory_format)
    return cls.from_pretrained(folder / name)


def model_card_prior(folder: Path) -> str | None:
    """The `prior:` entry of a model card's YAML header, as decoder repos name their prior."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    header = card.read_text().split("---")
    match = re.search(r"^prior:\s*\n\s*-\s*(\S+)|^prior:\s*(\S+)", header[1] if len(header) > 2 else "", re.M)
    return (match.group(1) or match.group(2)) if match else None


def sub_pipeline(pipe: DiffusionPipeline, cls: type, prefix: str = ""):
    """A `cls` pipeline over the components `pipe` holds as `prefix + name` (combined pipelines' stages)."""
    return pipe.derive(cls, **{n: getattr(pipe, prefix + n) for n in cls.components_order
                               if prefix + n in pipe.components})


def connected_prior(combined_cls, prior_cls, folder: Path, index: dict, given: dict, torch_dtype, variant,
                    hub: dict) -> dict[str, Any]:
    """A combined pipeline loaded from a decoder folder: the prior pipeline its model card names (a sibling
    folder or a Hub repo), as `prior_*` components."""
    if "prior_prior" in index or "prior_prior" in given:
        return {}
    prior = model_card_prior(folder)
    if prior is None:
        raise ValueError(f"{folder}: no prior_* components in model_index.json and no `prior:` in README.md")
    local = folder.parent / prior
    pipe = prior_cls.from_pretrained(local if local.is_dir() else prior, torch_dtype, variant, **hub)
    return {f"prior_{k}": v for k, v in pipe.components.items()
            if f"prior_{k}" in combined_cls.components_order and f"prior_{k}" not in given}


def call_args(fn: Callable, values: dict) -> dict:
    """The subset of `values` that `fn` accepts by name."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in values.items() if k in params}
