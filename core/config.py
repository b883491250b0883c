"""Loading YAML into pydantic models, with errors that name the field instead of a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mergetune.core.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """The first problem as one line: `source: field.path: message (allowed ...)`."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
        ctx_allowed = _allowed_keys(exc, first["loc"])
        if ctx_allowed:
            message += f"; allowed here: {ctx_allowed}"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {where + ': ' if where else ''}{message}{suffix}"


def _allowed_keys(exc: ValidationError, loc: tuple) -> str:
    model = getattr(exc, "_mergetune_model", None)
    if model is None:
        return ""
    # Walk the model fields along the location (skipping list indices) to the parent model.
    current = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return ""
        current = _inner_model(field.annotation)
        if current is None:
            return ""
    return ", ".join(current.model_fields)


def _inner_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def validate_model(cls: type[ModelT], data: object, source: str) -> ModelT:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        exc._mergetune_model = cls  # type: ignore[attr-defined]
        raise ConfigError(describe_validation_error(exc, source)) from None


def load_yaml(path: str | Path) -> object:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None


def load_yaml_model(cls: type[ModelT], path: str | Path) -> ModelT:
    """Parse a YAML file into `cls`; any problem is a one-line ConfigError naming the field."""
    return validate_model(cls, load_yaml(path), str(path))
