"""AutoPipelineForText2Image / Image2Image / Inpainting: pick the pipeline of a task for a checkpoint's family."""
from __future__ import annotations

from ..config import read_json
from .core import download

# A family is recognised by the prefix of the saved pipeline class; each task maps to one of our classes.
# The command line (cascade/cli.py) also reads its other tasks here; decoders among them get their prior from
# the family's text2img pipeline.
TASKS = {
    "KandinskyV22": {"text2img": "KandinskyV22CombinedPipeline", "img2img": "KandinskyV22Img2ImgCombinedPipeline",
                     "inpaint": "KandinskyV22InpaintCombinedPipeline", "controlnet": "KandinskyV22ControlnetPipeline",
                     "controlnet_img2img": "KandinskyV22ControlnetImg2ImgPipeline",
                     "interpolate": "KandinskyV22Pipeline"},
    "Wuerstchen": {"text2img": "WuerstchenCombinedPipeline"},
    "UnCLIP": {"text2img": "UnCLIPPipeline", "variation": "UnCLIPImageVariationPipeline"},
    "StableDiffusionLatentUpscale": {"upscale": "StableDiffusionLatentUpscalePipeline"},
}


def pipeline_class(saved_class: str, task: str):
    import cascade

    for prefix, classes in TASKS.items():
        if saved_class.startswith(prefix):
            if task not in classes:
                raise ValueError(f"{saved_class}: the {prefix} family has no {task} pipeline")
            return getattr(cascade, classes[task])
    raise ValueError(f"{saved_class}: no auto pipeline for this class (families: {sorted(TASKS)})")


class AutoPipeline:
    task: str

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built with from_pretrained or from_pipe")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        hub = {k: kwargs.get(k) for k in ("cache_dir", "revision", "local_files_only", "token")}
        folder = download(pretrained_model_name_or_path, kwargs.get("variant"), **hub)
        saved = read_json(folder / "model_index.json")["_class_name"]
        return pipeline_class(saved, cls.task).from_pretrained(folder, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **overrides):
        return pipeline_class(type(pipeline).__name__, cls.task).from_pipe(pipeline, **overrides)


class AutoPipelineForText2Image(AutoPipeline):
    task = "text2img"


class AutoPipelineForImage2Image(AutoPipeline):
    task = "img2img"


class AutoPipelineForInpainting(AutoPipeline):
    task = "inpaint"

