"""Which pydantic model validates each place in a checked YAML file.

The checker asks it which fields a mapping may hold (for nulls, unknown keys and
suggestions), which field names a list item (`id`, else `name`), and which other
fields a list's items may not share.
"""

from __future__ import annotations

import types
from typing import Annotated, Union, get_args, get_origin

import pydantic

from tether._yaml_nodes import Loc

__all__ = ["model_at", "name_field", "unique_fields"]


def _unwrap(annotation: object) -> object:
    """Strip `Annotated` and `| None` from a field's type."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is types.UnionType:
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def model_at(
    model: type[pydantic.BaseModel], loc: Loc
) -> type[pydantic.BaseModel] | None:
    """Return the model that validates the mapping at `loc`, if one does."""
    current: object = model
    for step in loc:
        current = _unwrap(current)
        if isinstance(step, str):
            if not (
                isinstance(current, type) and issubclass(current, pydantic.BaseModel)
            ):
                return None
            field = current.model_fields.get(step)
            if field is None:
                return None
            current = field.annotation
        else:
            args = get_args(current)
            if get_origin(current) not in (tuple, list) or not args:
                return None
            current = args[0]
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, pydantic.BaseModel):
        return current
    return None


def unique_fields(model: type[pydantic.BaseModel] | None) -> tuple[str, ...]:
    """Return the fields besides the id that a list's items may not share.

    A model declares them as `model_config["json_schema_extra"]["x-unique"]`.
    """
    extra = None if model is None else model.model_config.get("json_schema_extra")
    unique = extra.get("x-unique") if isinstance(extra, dict) else None
    return tuple(str(f) for f in unique) if isinstance(unique, list) else ()


def name_field(model: type[pydantic.BaseModel] | None) -> str | None:
    """Return the field that names a list item: `id`, else `name`."""
    if model is None:
        return None
    for key in ("id", "name"):
        if key in model.model_fields:
            return key
    return None
