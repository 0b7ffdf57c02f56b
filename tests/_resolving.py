"""What the tests of resolving a step in doubt share: a charge upstream that hangs up.

`make_world` opens an app on one backend with a `none` charge whose upstream
hangs up after charging while `World.hang_up` says so; `doubted` leaves a
charge in doubt, and `cut_off_capture` a keyed capture that an abort cut off.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
from tether.store import KeyId
from tether.testing import FakeClock

BACKENDS = ["sqlite", "memory", pytest.param("postgres", marks=pytest.mark.postgres)]
KEY = {"TETHER_RECORD_KEY": "cd" * 32}
"""Every app of a test signs with one key, so the CLI's writes verify."""
AGENT = tether.Principal("pay-bot", roles=["agent"], tenant="acme")


class ChargeIn(BaseModel):
    order: str
    cents: int


class ChargeOut(BaseModel):
    charge_id: str
    cents: int


@dataclass
class World:
    """An app on one backend, and the charges its upstream made."""

    app: tether.Tether
    db: str
    charges: list[str] = field(default_factory=list)
    hang_up: list[bool] = field(default_factory=list)
    """One entry per coming call: the upstream hangs up after charging."""


@contextmanager
def make_world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """Open a `World` on the backend `request.param` names, with `pay.charge` registered."""
    if request.param == "postgres":
        db = str(request.getfixturevalue("postgres_url"))
    elif request.param == "sqlite":
        db = f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
    else:
        db = "memory://"
    app = tether.Tether(db=db, config=resolvers(tmp_path), clock=FakeClock(), env={})
    w = World(app=app, db=db)

    @tether.capability("pay.charge", effect="write", idempotency="none")
    def charge(args: ChargeIn) -> ChargeOut:
        w.charges.append(args.order)
        if w.hang_up and w.hang_up.pop(0):
            raise ConnectionResetError("upstream hung up after charging")
        return ChargeOut(charge_id=f"ch_{len(w.charges)}", cents=args.cents)

    app.register(charge)
    with app:
        yield w


def hanging_charge(
    hang_up: list[bool], charge_id: str
) -> tether.Capability[ChargeIn, ChargeOut]:
    """A `none` charge that hangs up after charging while `hang_up` says so."""

    @tether.capability("pay.charge", effect="write", idempotency="none")
    def charge(args: ChargeIn) -> ChargeOut:
        if hang_up and hang_up.pop(0):
            raise ConnectionResetError("upstream hung up after charging")
        return ChargeOut(charge_id=charge_id, cents=args.cents)

    return charge


RESOLVERS = (
    "approvers: {alice: [ops], bob: [ops], al: [ops], oncall: [ops], "
    "p0: [ops], p1: [ops], p2: [ops], p3: [ops]}\n"
)
"""Who may answer for a step in doubt in these tests (as for approval requests)."""


def resolvers(folder: Path) -> Path:
    """Write a tether.yaml naming `RESOLVERS` into `folder`; return its path."""
    path = folder / "tether.yaml"
    path.write_text(RESOLVERS)
    return path


def key_of(key: str, capability: str = "pay.charge") -> KeyId:
    return KeyId(tenant="acme", principal_id="pay-bot", capability=capability, key=key)


def doubted(w: World, key: str | None) -> str:
    """Make a charge (under `key`) that is left in doubt; return its run's id."""
    w.hang_up.append(True)
    with (
        w.app.run(principal=AGENT, request="charge o-1") as run,
        pytest.raises(tether.InDoubt),
    ):
        run.call("pay.charge", {"order": "o-1", "cents": 500}, idempotency_key=key)
    return run.id


def kinds(app: tether.Tether, run_id: str) -> list[str]:
    return [e.data()["kind"] for e in app.store.events(run_id)]


def cut_off_capture(w: World) -> tuple[str, str]:
    """Abort a run mid-call in a keyed capture; return the run id and the key."""
    app = w.app

    @tether.capability("pay.capture", effect="write", idempotency="keyed")
    def capture(args: ChargeIn) -> ChargeOut:
        w.charges.append(args.order)
        if len(w.charges) == 1:
            app.abort(run_id, by="oncall", reason="stop everything")  # mid-call
        return ChargeOut(charge_id=f"ch_{len(w.charges)}", cents=args.cents)

    app.register(capture)
    key = f"capture-{uuid.uuid4().hex}"
    with app.run(principal=AGENT, request="x") as run:
        run_id = run.id
        with pytest.raises(tether.RunAborted):
            run.call(capture, {"order": "o-4", "cents": 9}, idempotency_key=key)
    return run_id, key
