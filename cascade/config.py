"""Config base: a frozen dataclass that reads and writes the reference's `config.json`."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any, ClassVar

DIFFUSERS_VERSION = "0.26.3"  # the specification's version, recorded in files we write
JSON_LIMIT = 64 * 2**20  # the largest config or shard index we read; real ones are under 1 MB
SIMPLE_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None)}


@dataclasses.dataclass(frozen=True)
class Config:
    """Fields and defaults are the reference's constructor arguments.

    `choices` maps a field to the values we implement; any other value is rejected when the config is
    built, so an unsupported checkpoint fails with a message naming the file and key instead of
    silently computing something else.
    """

    choices: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config", strict: bool = True, **overrides) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in {**d, **overrides}.items():
            if key.startswith("_"):
                continue
            if key not in names:
                # A key we have never heard of is an option we do not implement, unless it is unset.
                if strict and value not in (None, False):
                    raise ValueError(f"{source}: option {key!r} is not supported by {cls.__name__}")
                continue
            values[key] = tuple(value) if isinstance(value, list) else value
        config = cls(**values)
        config.check(source)
        return config

    def check(self, source: str = "config") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not has_type(value, f.type, f.default):
                raise ValueError(f"{source}: {f.name}={value!r} does not have the option's type ({f.type})")
            # Counts (num_train_timesteps, num_layers, ...): zero or less would fail later, far from the file.
            if f.name.startswith("num_") and isinstance(value, int) and value < 1:
                raise ValueError(f"{source}: {f.name} must be at least 1, got {value}")
        for key, allowed in self.choices.items():
            value = getattr(self, key)
            values = value if isinstance(value, tuple) else (value,)
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{source}: {key}={bad[0]!r} is not supported (expected one of {allowed})")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    # Mapping access, so `Cls.from_config(other.config)` and `config["key"]` work as in the reference.
    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self):
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def __contains__(self, key: str) -> bool:
        return hasattr(self, key)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def has_type(value: Any, annotation: str, default: Any = None) -> bool:
    """Whether `value` fits a field annotated `annotation` ("int | None", "tuple[int, ...]"); an untyped
    tuple's elements take the type of the default's. Annotations of other forms are not checked."""
    for kind in (k.strip() for k in str(annotation).split("|")):
        if kind.startswith("tuple"):
            if not isinstance(value, tuple):
                continue
            inner = kind[6:-6] if kind.endswith(", ...]") else None
            if inner is None and isinstance(default, tuple) and default:
                inner = type(default[0]).__name__
            if inner not in SIMPLE_TYPES or all(has_type(v, inner) for v in value):
                return True
        elif kind not in SIMPLE_TYPES:
            return True
        elif isinstance(value, SIMPLE_TYPES[kind]) and not (isinstance(value, bool) and kind != "bool"):
            return True
    return False


def inside(path: Path, folder: Path | None = None) -> Path:
    """`path` if it names a file inside `folder` (by default its own) once links are followed, else a
    ValueError naming it. In a Hub cache snapshot (`.../snapshots/<revision>/...`) files are links into the
    repository's `blobs`, so there the repository's folder is the bound."""
    path, folder = Path(path).absolute(), Path(folder if folder is not None else Path(path).parent).absolute()
    lexical = Path(os.path.normpath(path))
    if not lexical.is_relative_to(os.path.normpath(folder)):
        raise ValueError(f"{path}: outside the model folder {folder}")
    bound = next((p.parent.parent for p in (folder, *folder.parents) if p.parent.name == "snapshots"), folder)
    if not lexical.resolve().is_relative_to(bound.resolve()):
        raise ValueError(f"{path}: links to {lexical.resolve()}, outside the model folder {bound}")
    return lexical


def regular_file(path: Path, limit: int | None = None) -> os.stat_result:
    """The file's status if it is a regular file (not a device, FIFO or folder) within `limit` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if limit is not None and st.st_size > limit:
        raise ValueError(f"{path}: {st.st_size} bytes, more than the {limit} a config or index may have")
    return st


def read_json(path: Path, folder: Path | None = None) -> dict[str, Any]:
    """A config or index file: inside its model folder, a regular file of bounded size, a JSON object."""
    path = inside(path, folder)
    regular_file(path, JSON_LIMIT)
    with open(path, "rb") as f:
        raw = f.read(JSON_LIMIT + 1)  # the file may grow between the check and the read
    if len(raw) > JSON_LIMIT:
        raise ValueError(f"{path}: more than {JSON_LIMIT} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class Configurable:
    """`Cls(**config)`, `Cls.from_config(config)` and `.config` for models and schedulers alike."""

    config_class: ClassVar[type[Config]]
    config_name: ClassVar[str] = "config.json"

    def __init__(self, config: Config | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else self.config_class.from_dict(kwargs, type(self).__name__)

    @classmethod
    def from_config(cls, config: Config | dict | None = None, **overrides):
        d = dict(config.items()) if config is not None else {}
        # A config from another class (DDPM -> DDIM) keeps only the fields this class has.
        return cls(cls.config_class.from_dict(d, cls.__name__, strict=False, **overrides))

    def config_dict(self) -> dict[str, Any]:
        return {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION,
                **self.config.to_dict()}

    def register_to_config(self, **changes) -> None:
        self.config = self.config.replace(**changes)
