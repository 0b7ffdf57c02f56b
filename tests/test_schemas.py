"""The published JSON Schemas match the models they are generated from."""

from __future__ import annotations

from tether import schemas


def test_schema_files_match_the_models() -> None:
    """Every committed schema file equals what the models generate; run `make schemas` if not."""
    stale = [
        name
        for name, text in schemas.render().items()
        if not (schemas.FOLDER / name).exists()
        or (schemas.FOLDER / name).read_text() != text
    ]

    assert stale == [], f"schemas out of date: {stale}; run `make schemas`"
