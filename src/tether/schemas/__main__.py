"""`python -m tether.schemas` (`make schemas`): regenerate the schema files."""

from tether.schemas import generate

__all__: list[str] = []

for path in generate():
    print(f"wrote {path.name}")  # noqa: T201  # a maintenance command's output
