"""The public API as users type it; mypy and basedpyright check it, nothing runs it."""

from __future__ import annotations

from typing import assert_type

from pydantic import BaseModel

import tether


class RestartIn(BaseModel):
    service: str


class RestartOut(BaseModel):
    restarted: bool


@tether.capability("infra.restart", effect="write", idempotency="keyed", resource="k8s")
def restart(args: RestartIn) -> RestartOut:
    return RestartOut(restarted=bool(args.service))


@tether.capability("infra.arestart", effect="write", idempotency="keyed")
async def arestart(args: RestartIn, ctx: tether.CallContext) -> RestartOut:
    assert_type(ctx.idempotency_key, str | None)
    return RestartOut(restarted=bool(args.service))


assert_type(restart, tether.Capability[RestartIn, RestartOut])
assert_type(arestart, tether.Capability[RestartIn, RestartOut])

app = tether.Tether(db="sqlite:///ops.db")
app.register(restart, arestart)
principal = tether.Principal("ops-bot", roles=["agent"], tenant="acme")

with app.run(principal=principal, request="restart api") as run:
    out = run.call(
        "infra.restart", {"service": "api"}, idempotency_key="inc-42-restart"
    )
    assert_type(out, BaseModel)
    typed = run.call(restart, {"service": "api"})
    assert_type(typed, RestartOut)
    outcome = run.step("infra.restart", {"service": "api"}, dry_run=False)
    assert_type(outcome, tether.Outcome)
    assert_type(run.id, str)


async def main() -> None:
    async with app.run(principal=principal, request="restart api") as run:
        got = await run.acall(arestart, {"service": "api"})
        assert_type(got, RestartOut)


report = app.verify("run_x")
assert_type(report, tether.VerifyReport)
try:
    pass
except tether.TetherError as exc:
    assert_type(exc.code, str)

with app.run(principal=principal, request="think", budget=100) as run:
    run.check_turn_room()  # raises LimitExceeded when a model budget is spent

row = app.abort("run_x", by="alice", reason="looping on restarts")
assert_type(row.status, str)
try:
    pass
except tether.RunAborted as aborted:
    lost: tether.LeaseLost = aborted  # what callers caught before it existed
