"""Loading YAML into pydantic models, with errors that name the field instead of a traceback."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from mergetune.core.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """The first problem as one line: `source: field.path: message (allowed ...)`."""
    first = exc.errors()[0]
    shown, parent = _walk(getattr(exc, "_mergetune_model", None), first["loc"])
    where = ".".join(str(p) for p in shown)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
        if parent is not None:
            message += f"; allowed here: {', '.join(parent.model_fields)}"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {where + ': ' if where else ''}{message}{suffix}"


def _walk(model: type[BaseModel] | None, loc: tuple) -> tuple[list, type[BaseModel] | None]:
    """The location as the user wrote it, and the model holding its last key.

    Pydantic puts the chosen member of a union into the location (`evaluator.quick.limt`: the
    tag of a discriminated union, or the class name); those parts are not in the user's file.
    """
    shown: list = []
    annotation: object = model
    parent: type[BaseModel] | None = None
    for part in loc:
        models = _models_in(annotation)
        if isinstance(part, str) and len(models) > 1:
            chosen = next((m for m in models if part == m.__name__ or part in _tags(m)), None)
            if chosen is not None:
                annotation = chosen
                continue
        shown.append(part)
        parent = models[0] if len(models) == 1 else None
        if parent is not None and isinstance(part, str) and part in parent.model_fields:
            annotation = parent.model_fields[part].annotation
        else:
            annotation = _item_of(annotation)
    return shown, parent


def _unwrapped(annotation: object) -> list[object]:
    """The members of a union / Optional / Annotated annotation (the annotation itself otherwise)."""
    if get_origin(annotation) is Annotated:
        return _unwrapped(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _unwrapped(arg) if m is not type(None)]
    return [annotation]


def _models_in(annotation: object) -> list[type[BaseModel]]:
    return [m for m in _unwrapped(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def _tags(model: type[BaseModel]) -> list[object]:
    """Values of the model's Literal fields (a discriminated union's tag is one of them)."""
    return [v for f in model.model_fields.values() if get_origin(f.annotation) is Literal for v in get_args(f.annotation)]


def _item_of(annotation: object) -> object:
    """What a dict/list/tuple annotation holds (the value type of a dict); None for anything else."""
    for member in _unwrapped(annotation):
        args = get_args(member)
        if get_origin(member) is dict and len(args) == 2:
            return args[1]
        if get_origin(member) in (list, tuple, set, frozenset) and args:
            return args[0]
    return None


def keyed_error(key: str | int, message: str, value: object) -> ValidationError:
    """A validation error located at `key` inside the field being validated (e.g. one entry of a mapping)."""
    details = InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(key,), input=value)
    return ValidationError.from_exception_data("value_error", [details])


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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); save it as UTF-8") from None
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
