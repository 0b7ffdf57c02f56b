"""Hypothesis strategies and capabilities built from public tool schemas.

The public data (BFCL and ToolTalk tool docs) lives outside the repository, in
`TETHER_DATA_DIR` or `../shared/data` beside the checkout (see
`shared/data/README.md`); tests that need it skip, naming `TETHER_DATA_DIR`, when
it is absent.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, create_model

import tether

__all__ = [
    "INT64",
    "Handled",
    "bfcl_doc",
    "capability_from_doc",
    "data_dir",
    "json_values",
    "model_from_properties",
    "mutated",
    "mutated_args",
    "public_name",
    "require_data_dir",
    "tooltalk_doc",
    "tooltalk_gold_calls",
    "valid_args",
]

INT64 = (-(2**63), 2**63 - 1)
"""Integers every JSON parser and the canonical encoder carry exactly."""

_REPO = Path(__file__).resolve().parent.parent


# -- public data -------------------------------------------------------------------


def data_dir() -> Path | None:
    """Return the public data folder (`TETHER_DATA_DIR`, else `../shared/data`), if present."""
    given = os.environ.get("TETHER_DATA_DIR")
    path = Path(given) if given else _REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


def require_data_dir() -> Path:
    """Return the public data folder, or skip the test saying how to provide it."""
    path = data_dir()
    if path is None:
        pytest.skip(
            "public tool schemas not found: set TETHER_DATA_DIR to the shared/data "
            "folder (BFCL, ToolTalk) or check it out beside the repository"
        )
    return path


@cache
def _bfcl_docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    folder = require_data_dir() / "bfcl" / "multi_turn_func_doc"
    for file in sorted(folder.glob("*.json")):
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                doc = json.loads(line)
                docs[doc["name"]] = doc
    return docs


def bfcl_doc(name: str) -> dict[str, Any]:
    """Return one BFCL v4 function doc (`name`, `description`, `parameters`, `response`)."""
    return _bfcl_docs()[name]


def tooltalk_doc(name: str) -> dict[str, Any]:
    """Return one ToolTalk API spec, reshaped like a BFCL doc.

    ToolTalk marks each parameter `required: true|false`; the BFCL shape keeps a
    `required` list beside the properties. APIs that need a login also take the
    `session_token` that ToolTalk's gold calls pass.
    """
    path = require_data_dir() / "tooltalk" / "tooltalk_api_specs.json"
    spec = json.loads(path.read_text(encoding="utf-8"))["apis"][name]
    params = {k: dict(v) for k, v in spec["parameters"].items()}
    required = [k for k, v in params.items() if v.pop("required", False)]
    if spec.get("requires_auth"):
        # ToolTalk passes the session token beside the declared parameters.
        params["session_token"] = {"type": "string", "description": "Session token."}
        required.append("session_token")
    return {
        "name": name,
        "description": spec["description"],
        "parameters": {"type": "dict", "properties": params, "required": required},
        "response": {"type": "dict", "properties": spec["output"]},
        "is_action": spec["is_action"],
    }


def tooltalk_gold_calls() -> list[tuple[str, dict[str, Any]]]:
    """Return every gold API call of ToolTalk's easy conversations: (api, parameters)."""
    folder = require_data_dir() / "tooltalk" / "easy"
    calls = []
    for file in sorted(folder.glob("*.json")):
        conversation = json.loads(file.read_text(encoding="utf-8"))["conversation"]
        for turn in conversation:
            for api in turn.get("apis", []):
                request = api["request"]
                calls.append((request["api_name"], dict(request["parameters"])))
    return calls


# -- models from schemas -------------------------------------------------------------

_SCALARS: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "number": float,
    "boolean": bool,
}
_SECRET_WORDS = ("password", "token", "secret", "api_key")


def _py_type(prop: Mapping[str, Any], name: str, secrets: bool) -> Any:
    kind = prop.get("type", "string")
    if kind in _SCALARS:
        if secrets and kind == "string" and any(w in name for w in _SECRET_WORDS):
            return tether.Secret
        return _SCALARS[kind]
    if kind == "array":
        return list[_py_type(prop.get("items", {}), name, secrets)]  # type: ignore[misc]
    if kind in ("dict", "object"):
        if prop.get("properties"):
            return model_from_properties(
                f"{name.title()}Part", prop["properties"], required=(), secrets=secrets
            )
        return dict[str, Any]
    raise ValueError(f"no Python type for schema type {kind!r}")


def model_from_properties(
    title: str,
    properties: Mapping[str, Mapping[str, Any]],
    *,
    required: tuple[str, ...] | list[str] = (),
    secrets: bool = False,
) -> type[BaseModel]:
    """Build a pydantic model (extra keys forbidden) from BFCL/ToolTalk properties.

    An `enum` is left to the description, as the tools themselves do: ToolTalk's
    `CreateEvent` declares one on the wrong field and its gold calls break it.

    Optional fields default to the schema's `default`, else None; names that are not
    identifiers become aliases. With `secrets`, string fields named like a password
    or token are `tether.Secret`.
    """
    fields: dict[str, Any] = {}
    for i, (name, prop) in enumerate(sorted(properties.items())):
        py = _py_type(prop, name, secrets)
        attr = name if name.isidentifier() and not name.startswith("_") else f"f{i}"
        alias = None if attr == name else name
        if name in required:
            fields[attr] = (py, Field(alias=alias, description=prop.get("description")))
        else:
            default = prop.get("default")
            fields[attr] = (
                py | None,
                Field(default, alias=alias, description=prop.get("description")),
            )
    safe_title = "".join(c for c in title.title() if c.isalnum()) or "Model"
    return create_model(safe_title, __config__=ConfigDict(extra="forbid"), **fields)


class Handled:
    """What a capability built by `capability_from_doc` received, call by call."""

    def __init__(self) -> None:
        self.args: list[BaseModel] = []


def capability_from_doc(
    doc: Mapping[str, Any],
    *,
    handled: Handled | None = None,
    secrets: bool = False,
    raises: Callable[[BaseModel], BaseException] | None = None,
) -> tether.Capability[Any, Any]:
    """Define a capability from a public tool doc: its models, a recording handler.

    The name is `public.<snake_name>`; the effect is `write` (keyed) when the doc
    says the tool acts (`is_action`), else `read`. The handler returns an empty
    output (every response field is optional) or raises `raises(args)`.
    """
    params = doc["parameters"]
    in_model = model_from_properties(
        f"{doc['name']}In",
        params.get("properties", {}),
        required=params.get("required", []),
        secrets=secrets,
    )
    out_model = model_from_properties(
        f"{doc['name']}Out", doc.get("response", {}).get("properties", {})
    )
    record = handled if handled is not None else Handled()

    def handler(args: BaseModel) -> BaseModel:
        record.args.append(args)
        if raises is not None:
            raise raises(args)
        return out_model()

    handler.__annotations__ = {"args": in_model, "return": out_model}
    handler.__doc__ = doc["description"]
    acts = bool(doc.get("is_action", False))
    return tether.capability(
        public_name(doc["name"]),
        effect="write" if acts else "read",
        idempotency="keyed" if acts else None,
    )(handler)


def public_name(tool: str) -> str:
    """Return the capability name for a public tool: `public.` and its snake_case name."""
    out = "".join(f"_{c.lower()}" if c.isupper() else c for c in tool).lstrip("_")
    return "public." + "".join(c if c.isalnum() or c == "_" else "_" for c in out)


# -- values ------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)  # utf-8: no lone surrogates
_KEYS = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)


def json_values(*, max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Generate JSON values that every encoder carries exactly.

    Integers within 64 bits, finite floats, text without lone surrogates; lists and
    objects nest inside each other.
    """
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(*INT64),
        st.floats(allow_nan=False, allow_infinity=False),
        _TEXT,
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(_KEYS, inner, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def _value_for(prop: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    kind = prop.get("type", "string")
    if kind == "string":
        return _TEXT
    if kind == "integer":
        return st.integers(*INT64)
    if kind in ("float", "number"):
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(_value_for(prop.get("items", {})), max_size=4)
    if kind in ("dict", "object"):
        props = prop.get("properties")
        if not props:
            return st.dictionaries(_KEYS, json_values(max_leaves=4), max_size=3)
        return st.fixed_dictionaries(
            {}, optional={k: _value_for(v) for k, v in props.items()}
        )
    raise ValueError(f"no strategy for schema type {kind!r}")


def valid_args(doc: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Generate args that match a tool doc's parameters (required keys always present)."""
    params = doc["parameters"]
    props: Mapping[str, Any] = params.get("properties", {})
    required = set(params.get("required", []))
    return st.fixed_dictionaries(
        {k: _value_for(v) for k, v in props.items() if k in required},
        optional={k: _value_for(v) for k, v in props.items() if k not in required},
    )


def _mutations(args: dict[str, Any]) -> Iterator[st.SearchStrategy[Any]]:
    keys = sorted(args)
    yield st.just(args)
    yield st.builds(lambda k, v: {**args, k: v}, _KEYS, json_values(max_leaves=3))
    yield st.builds(lambda v: [args, v], json_values(max_leaves=2))
    yield json_values()
    if keys:
        key = st.sampled_from(keys)
        yield key.map(lambda k: {n: v for n, v in args.items() if n != k})
        yield st.builds(lambda k, v: {**args, k: v}, key, json_values(max_leaves=3))
        yield key.map(lambda k: {**args, k: json.dumps(args[k])})
        yield key.map(lambda k: {**args, k: [args[k]]})


def mutated(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """Generate `valid` args and mutations of them: a key dropped, added or retyped."""
    return valid.flatmap(lambda a: st.one_of(*_mutations(a)))


def mutated_args(doc: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """Generate a tool doc's valid args and mutations of them."""
    return mutated(valid_args(doc))
