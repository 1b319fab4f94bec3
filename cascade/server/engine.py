"""The job layer (cascade/jobs.py) as the server uses it: the served models, each task's pipeline loaded once
at start, and one function that runs a prepared recipe with progress and cancellation. The server never
calls a pipeline itself."""
from __future__ import annotations

import base64
import io

from .. import jobs
from ..recipe import CHECKS, OPTIONS, RecipeError
from .api import TASK_INPUTS, UPLOADED, Served
from .executor import Cancelled

SETTINGS = ("steps", "prior_steps", "super_res_steps", "guidance", "prior_guidance", "strength")


def sample_inputs(task: str) -> dict:
    import PIL.Image

    image = PIL.Image.new("RGB", (64, 64), (128, 128, 128))
    return {name: image.convert("L" if name == "mask" else "RGB") for name in TASK_INPUTS[task]}


class Engine:
    """The models named at start, each probed once per task: what it can run, with which settings and
    samplers; probing loads every pipeline the model's tasks use, so requests never wait for a load."""

    def __init__(self, names: list[str], dtype: str | None = None, device: str | None = None):
        self.models, self.dtype, self.device = jobs.Models(), dtype, device
        self.served = {name: self.probe(name) for name in names}

    def prepare(self, recipe, inputs: dict):
        """jobs.prepare with the server's device and dtype and the uploaded images."""
        recipe = recipe.replace(dtype=self.dtype, device=self.device)
        prepared = jobs.prepare(recipe, self.models, images=inputs)
        used = prepared.recipe
        # The pipelines check this only after the prior has run; a request should hear it before.
        if used.strength is not None and used.steps and int(used.steps * used.strength) < 1:
            raise RecipeError("strength", f"{used.strength:g} of {used.steps} steps leaves no step to run")
        return prepared

    def probe(self, name: str) -> Served:
        from ..schedulers import samplers_for

        prepared = {}
        for task in TASK_INPUTS:
            inputs = sample_inputs(task)
            try:
                recipe = jobs.Recipe(model=name, task=task, prompt=None if task == "variation" else "",
                                     **{k: UPLOADED[k] for k in inputs})
                prepared[task] = self.prepare(recipe, inputs)
            except (RecipeError, ValueError):
                continue  # the model's family has no pipeline for this task
        if not prepared:
            raise ValueError(f"{name}: none of the tasks {list(TASK_INPUTS)} runs with this model")
        first = next(iter(prepared.values()))
        base = type(first.pipe)
        own = first.recipe.scheduler
        samplers = [own] + [s for s in samplers_for(base) if s != own and runs(s, base)]
        settings = [k for k in SETTINGS if any(getattr(p.recipe, k) is not None for p in prepared.values())]
        folder = jobs.locate(name)
        native = jobs.native_size(folder)
        return Served(name, jobs.pipeline_name(folder), tuple(prepared), tuple(samplers), first.recipe.size,
                      tuple(settings), native[1] if native else None)

    @staticmethod
    def field_of(message: str) -> str:
        """The recipe field a pipeline's error message starts with ("height and width must be..." -> size),
        else "recipe"."""
        word = message.replace(":", " ").split(" ", 1)[0]
        named = (k for k, names in OPTIONS.items() if word in names)
        return next(named, word if word in CHECKS else "recipe")

    def steps(self, prepared) -> int:
        return steps_per_image(prepared.recipe) * prepared.recipe.n

    def run(self, job) -> None:
        """Make a queued job's images, one seed after the other, reporting every step."""
        prepared, per_image = job.prepared, steps_per_image(job.prepared.recipe)
        for seed in prepared.seeds():
            counter = StepCounter(job, per_image * len(job.results))
            try:
                result = prepared.make(seed, counter.on_step, job.cancel_event)
            except jobs.Cancelled:
                raise Cancelled(job.id) from None
            job.results.append(result_dict(result))
            job.step = per_image * len(job.results)
            job.notify()


class StepCounter:
    """Stage-wise steps (prior 1..k, then decoder 1..m) -> the job's running count over all stages."""

    def __init__(self, job, done: int):
        self.job, self.base, self.stage, self.last = job, done, None, 0

    def on_step(self, stage: str, step: int, total: int) -> None:
        if stage != self.stage:
            self.base += self.last if self.stage is not None else 0
            self.stage = stage
        self.last = total
        self.job.stage, self.job.step = stage, self.base + step
        self.job.notify()


def runs(sampler: str, base: type) -> bool:
    try:
        jobs.check_sampler(sampler, base)
    except RecipeError:
        return False
    return True


def steps_per_image(recipe) -> int:
    decoder = recipe.steps or 0
    if recipe.strength is not None and recipe.task != "upscale":
        decoder = min(int(decoder * recipe.strength), decoder)
    return (recipe.prior_steps or 0) + decoder + (recipe.super_res_steps or 0)


def result_dict(result) -> dict:
    """One image as the APIs answer it: PNG bytes, base64, the recipe as used, the AUTOMATIC1111 infotext."""
    png = result.png()
    recipe = result.recipe
    return {"png": png, "b64": base64.b64encode(png).decode(), **recipe.to_dict(), "size": list(recipe.size),
            "parameters": jobs.parameters(recipe), "seconds": round(result.seconds, 3)}


def png_info(image) -> dict:
    """What a PNG says about how it was made: cascade's recipe (None if it has none), the infotext, and the
    infotext parsed."""
    text = jobs.read_png(image)
    try:
        recipe = jobs.Recipe.from_png(image).to_dict()
    except ValueError:
        recipe = None
    infotext = text.get("parameters")
    return {"recipe": recipe, "parameters": infotext, "text": text,
            "fields": jobs.parse_parameters(infotext) if infotext else {}}
