"""Published JSON Schemas for `tether.yaml` and record events (a contract; `make schemas`).

The files beside this module are generated from the models by `generate()` and
committed, so a format change shows in review; a test fails when they drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pydantic

__all__ = ["FOLDER", "generate", "render"]

FOLDER = Path(__file__).parent


def render() -> dict[str, str]:
    """Return each schema file's name and the text it should hold."""
    from tether.config import Settings
    from tether.record import Event

    events = pydantic.TypeAdapter(
        Annotated[Event, pydantic.Field(discriminator="kind")]
    )
    schemas = {
        "tether.yaml.schema.json": Settings.model_json_schema(),
        "record-event.schema.json": events.json_schema(),
    }
    return {
        name: json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in schemas.items()
    }


def generate() -> list[Path]:
    """Write the schema files; return the paths that changed."""
    changed = []
    for name, text in render().items():
        path = FOLDER / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed
