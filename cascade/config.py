"""Config base: a frozen dataclass that reads and writes the reference's `config.json`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

DIFFUSERS_VERSION = "0.26.3"  # the specification's version, recorded in files we write


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


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


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
