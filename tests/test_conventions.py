"""What review would otherwise repeat: the public API, module exports, error codes."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import tether
import tether.errors
import tether.record

PUBLIC_API = [
    "Admission",
    "AdmissionStatus",
    "ApprovalClosed",
    "ApprovalRequired",
    "BreakerOpen",
    "CallContext",
    "Capability",
    "CapabilityFailed",
    "ConfigError",
    "Decision",
    "DecisionRequest",
    "Denied",
    "Effect",
    "Idempotency",
    "IdempotencyConflict",
    "IllegalTransition",
    "InDoubt",
    "IntegrityError",
    "InvalidKey",
    "InvalidOutput",
    "KeyInUse",
    "LeaseLost",
    "LimitExceeded",
    "NotAllowedToApprove",
    "NotFound",
    "Outcome",
    "OutcomeStatus",
    "PlanStep",
    "Policy",
    "PreconditionFailed",
    "Principal",
    "Refused",
    "Run",
    "RunAborted",
    "RunState",
    "ScriptedPlanner",
    "Secret",
    "StepTimeout",
    "StoreError",
    "Tether",
    "TetherError",
    "UsageError",
    "ValidationFailed",
    "Verdict",
    "VerifyReport",
    "__version__",
    "capability",
]
"""The frozen export list: a change here is an API change and shows in review."""


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(tether.__path__, prefix="tether.")
    )


def test_public_api_is_frozen_and_sorted() -> None:
    """`tether.__all__` equals the frozen list (ruff's RUF022 keeps it sorted)."""
    assert tether.__all__ == PUBLIC_API


def test_every_public_name_exists() -> None:
    """Every name in `tether.__all__` is importable from `tether`."""
    missing = [name for name in tether.__all__ if not hasattr(tether, name)]

    assert missing == []


def test_every_module_declares_all() -> None:
    """Every module of the package declares `__all__`."""
    lacking = [
        m for m in _modules() if not hasattr(importlib.import_module(m), "__all__")
    ]

    assert lacking == []


def test_error_codes_are_unique_and_snake_case() -> None:
    """Each error class has its own stable snake_case code."""
    classes = [getattr(tether.errors, n) for n in tether.errors.__all__]
    codes = [c.code for c in classes]

    assert len(codes) == len(set(codes))
    assert all(code.replace("_", "").isalpha() and code.islower() for code in codes)
    assert all(issubclass(c, tether.TetherError) for c in classes)


def test_record_events_are_slotted_keyword_only_dataclasses() -> None:
    """Record events are slotted, keyword-only dataclasses (unfrozen for speed: see _events.py)."""
    events = [
        getattr(tether.record, n)
        for n in tether.record.__all__
        if dataclasses.is_dataclass(getattr(tether.record, n))
    ]

    assert len(events) > 10
    for cls in events:
        assert hasattr(cls, "__slots__"), cls
        fields = dataclasses.fields(cls)
        assert all(f.kw_only for f in fields), cls


def test_record_events_declare_fields_sorted() -> None:
    """Each event declares its fields sorted, which makes orjson's native output canonical."""
    unsorted = []
    for name in tether.record.__all__:
        cls = getattr(tether.record, name)
        if dataclasses.is_dataclass(cls) and hasattr(cls, "kind"):
            names = [f.name for f in dataclasses.fields(cls)]
            if names != sorted(names):
                unsorted.append(name)

    assert unsorted == []


def test_event_kinds_are_unique() -> None:
    """No two event classes share a `kind`."""
    kinds = [
        cls.kind
        for cls in (getattr(tether.record, n) for n in tether.record.__all__)
        if dataclasses.is_dataclass(cls) and hasattr(cls, "kind")
    ]

    assert len(kinds) == len(set(kinds))
