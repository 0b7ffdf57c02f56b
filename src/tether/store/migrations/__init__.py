"""Versioned schema migrations, one folder per backend, applied in order on open."""

__all__: list[str] = []
