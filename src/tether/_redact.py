"""Secrets in the record: the `Secret` field type, and finding and masking secret values.

A secret never reaches a record or a message in clear: its field serializes as
`SECRET_MASK`, and `redact_text` masks its clear, URL-encoded and base64 forms.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Annotated
from urllib.parse import quote, quote_plus

import pydantic
from pydantic import BaseModel, SecretBytes, SecretStr

__all__ = ["SECRET_MASK", "Secret", "redact_json", "redact_text", "secret_values"]

SECRET_MASK = "**********"  # noqa: S105  # a mask, not a password
"""What a secret field becomes in a record (the same mask pydantic's `SecretStr` uses)."""


class _SecretMarker:
    __slots__ = ()

    def __repr__(self) -> str:
        return "tether.Secret"


_SECRET = _SecretMarker()


class _SecretText(str):
    """A secret's clear text for the handler, whose repr is the mask.

    Printing a model, or a traceback's locals, does not show the secret.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(SECRET_MASK)


Secret = Annotated[
    str,
    _SECRET,
    pydantic.AfterValidator(_SecretText),
    pydantic.PlainSerializer(lambda _v: SECRET_MASK, return_type=str, when_used="json"),
    pydantic.WithJsonSchema(
        {"type": "string", "writeOnly": True, "x-tether-secret": True}
    ),
]
"""A `str` field that tether never stores or prints in clear (like `SecretStr`, but
the handler gets a plain `str`)."""


def secret_values(model: BaseModel) -> list[str]:
    """Return the clear values of every secret field in `model`, nested included."""
    found: list[str] = []
    _collect(model, found, 0)
    # A tether.Secret inside Optional, list or dict carries no field metadata of
    # its own: whatever JSON mode masks is a secret.
    _masked(model.model_dump(), model.model_dump(mode="json"), found, 0)
    return [s for s in found if s]


def _masked(py: object, js: object, found: list[str], depth: int) -> None:
    if depth > 32:
        return
    if isinstance(py, str) and js == SECRET_MASK and py != SECRET_MASK:
        found.append(py)
    elif isinstance(py, Mapping) and isinstance(js, Mapping):
        for k, v in py.items():
            if k in js:
                _masked(v, js[k], found, depth + 1)
    elif isinstance(py, (list, tuple)) and isinstance(js, (list, tuple)):
        for a, b in zip(py, js, strict=False):
            _masked(a, b, found, depth + 1)


def _collect(value: object, found: list[str], depth: int) -> None:
    if depth > 32:
        return
    if isinstance(value, SecretStr):
        found.append(value.get_secret_value())
    elif isinstance(value, SecretBytes):
        found.append(value.get_secret_value().decode(errors="replace"))
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            item = getattr(value, name, None)
            if isinstance(item, str) and _SECRET in info.metadata:
                found.append(item)
            else:
                _collect(item, found, depth + 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            _collect(item, found, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, found, depth + 1)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """Replace each secret in `text`, also URL-encoded or base64, with the mask."""
    forms: set[str] = set()
    for secret in secrets:
        raw = secret.encode()
        forms.update(
            {
                secret,
                quote(secret, safe=""),
                quote(secret),
                quote_plus(secret),
                base64.b64encode(raw).decode(),
                base64.urlsafe_b64encode(raw).decode(),
                base64.b64encode(raw).decode().rstrip("="),
                base64.urlsafe_b64encode(raw).decode().rstrip("="),
            }
        )
    for form in sorted(forms - {""}, key=len, reverse=True):
        text = text.replace(form, SECRET_MASK)
    return text


def redact_json(value: object, secrets: Iterable[str], _depth: int = 0) -> object:
    """Return JSON data `value` with `redact_text` applied to every string in it, keys too.

    For data a handler made from the call's args (a dry run's preview): a
    plain `str` field may quote a secret arg that its own type does not mark.
    Past 64 levels the rest is masked whole (JSON that deep is not a preview).
    """
    if _depth > 64:
        return SECRET_MASK
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        return {
            redact_text(str(k), secrets): redact_json(v, secrets, _depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_json(v, secrets, _depth + 1) for v in value]
    return value
