"""Every error tether raises, under one base, each with a stable `code`.

```
TetherError
├── UsageError                    usage_error             the developer misused the API
│   ├── ConfigError(ValueError)   config_invalid          names the file and the path in it
│   └── IllegalTransition         illegal_transition      a run moved where its lifecycle forbids
├── ValidationFailed(ValueError)  invalid_arguments       args broke the input schema
│   ├── InvalidKey                invalid_idempotency_key the key is empty, too long or has control chars
│   └── InvalidOutput             invalid_output          the result broke the output schema
├── Refused                       (per subclass)          the gateway said no; has the Outcome
│   ├── PreconditionFailed        precondition_failed
│   ├── Denied                    policy_denied
│   ├── ApprovalRequired          approval_required       parked; carries the approval id
│   ├── ApprovalClosed            approval_closed         the request is decided, used or expired
│   ├── NotAllowedToApprove       not_an_approver         the requester, or no approver role
│   ├── LimitExceeded             limit_exceeded          names the limit, says what is left
│   ├── BreakerOpen               breaker_open            names the breaker and its degraded mode
│   └── KeyInUse                  idempotency_key_in_use
├── IdempotencyConflict           idempotency_error       same key, different args
├── CapabilityFailed              capability_failed       the handler raised; retryable under its key
│   └── StepTimeout(TimeoutError) step_timeout            the handler overran its timeout
├── InDoubt                       in_doubt                started, outcome unknown: a human
├── StoreError                    store_error
│   ├── HeadMoved                 record_moved            the record grew under this writer
│   └── LeaseLost                 lease_lost              a newer epoch holds the run
│       └── RunAborted            run_aborted             a person aborted the run (who, why)
├── NotFound(LookupError)         not_found               no such run, capability or event
├── StepLimitReached              max_steps_exceeded      a planner wanted more steps than allowed
├── PlannerGaveUp                 planner_gave_up         a planner ended without doing the task
└── IntegrityError                integrity_error         the chain or its signed head fails
```

Codes are what the CLI prints, the record stores and tests match on; the wording
of messages may change, codes do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from decimal import Decimal

    from tether.record import Outcome

__all__ = [
    "ApprovalClosed",
    "ApprovalRequired",
    "BreakerOpen",
    "CapabilityFailed",
    "ConfigError",
    "Denied",
    "HeadMoved",
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
    "PlannerFailed",
    "PlannerGaveUp",
    "PreconditionFailed",
    "Refused",
    "RunAborted",
    "StepLimitReached",
    "StepTimeout",
    "StoreError",
    "TetherError",
    "UsageError",
    "ValidationFailed",
]


class TetherError(Exception):
    """Base of every error tether raises; catch it to catch them all."""

    code: ClassVar[str] = "tether_error"

    def __init__(self, message: str, *, outcome: Outcome | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.outcome = outcome
        """The gateway's recorded outcome for the step, when a step was involved."""


class UsageError(TetherError):
    """The developer misused the API (a bug in the calling code, not in the agent)."""

    code = "usage_error"


class ConfigError(UsageError, ValueError):
    """A configuration file or setting is invalid; the message names where."""

    code = "config_invalid"


class IllegalTransition(UsageError):
    """A run was asked to move to a state its lifecycle does not allow from here."""

    code = "illegal_transition"


class ValidationFailed(TetherError, ValueError):
    """Arguments did not match the capability's input schema."""

    code = "invalid_arguments"


class InvalidKey(ValidationFailed):
    """An idempotency key is empty, longer than 255 characters or holds control characters."""

    code = "invalid_idempotency_key"


class InvalidOutput(ValidationFailed):
    """A handler returned a value that does not match its output schema."""

    code = "invalid_output"


class Refused(TetherError):
    """The gateway refused the step before it started; nothing was executed."""

    code = "refused"


class PreconditionFailed(Refused):
    """A capability's precondition did not hold for these arguments."""

    code = "precondition_failed"


class Denied(Refused):
    """Policy denied the step; `reasons` holds each deciding rule's reason."""

    code = "policy_denied"

    def __init__(
        self,
        message: str,
        *,
        outcome: Outcome | None = None,
        rule_ids: tuple[str, ...] = (),
        reasons: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, outcome=outcome)
        self.rule_ids = rule_ids
        self.reasons = reasons


class ApprovalRequired(Refused):
    """Policy requires a person to approve the step; it was parked, not run."""

    code = "approval_required"

    def __init__(
        self,
        message: str,
        *,
        outcome: Outcome | None = None,
        approval_id: str | None = None,
        created: bool = False,
    ) -> None:
        super().__init__(message, outcome=outcome)
        self.approval_id = approval_id
        self.created = created
        """True when this call made the request (not one already pending)."""


class ApprovalClosed(Refused):
    """An approval request can no longer be decided: already decided, used or expired."""

    code = "approval_closed"


class NotAllowedToApprove(Refused):
    """This person may not decide this request (the requester, or no approver role)."""

    code = "not_an_approver"


class LimitExceeded(Refused):
    """A quota, budget, concurrency cap or rate limit refused the step.

    `limit_id` names the limit, `left` is what is left of it, and
    `retry_after` (seconds, when known) says when a call may fit again.
    """

    code = "limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        outcome: Outcome | None = None,
        limit_id: str = "",
        left: Decimal | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, outcome=outcome)
        self.limit_id = limit_id
        self.left = left
        self.retry_after = retry_after


class BreakerOpen(Refused):
    """The circuit breaker of the capability's resource is open (or its trial calls are taken).

    `mode` is the breaker's degraded mode: `stash` parks the run `degraded`,
    `read_only` refuses writes while reads go through. (`escalate` raises
    `ApprovalRequired` instead.)
    """

    code = "breaker_open"

    def __init__(
        self,
        message: str,
        *,
        outcome: Outcome | None = None,
        breaker_id: str = "",
        mode: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, outcome=outcome)
        self.breaker_id = breaker_id
        self.mode = mode
        self.retry_after = retry_after


class KeyInUse(Refused):
    """Another call under the same idempotency key is still in progress."""

    code = "idempotency_key_in_use"


class IdempotencyConflict(TetherError):
    """The idempotency key was used before with different arguments."""

    code = "idempotency_error"


class CapabilityFailed(TetherError):
    """The handler raised; for a `keyed` capability a retry reuses the key."""

    code = "capability_failed"


class StepTimeout(CapabilityFailed, TimeoutError):
    """The handler did not finish within the capability's timeout."""

    code = "step_timeout"


class InDoubt(TetherError):
    """The step started and its outcome is unknown; a person must decide."""

    code = "in_doubt"


class StoreError(TetherError):
    """The store could not be read or written; nothing was executed after a failed write."""

    code = "store_error"


class HeadMoved(StoreError):
    """The run's record grew under this writer (another writer, or a person's decision)."""

    code = "record_moved"


class LeaseLost(StoreError):
    """A newer lease epoch holds the run; this worker may no longer write to it."""

    code = "lease_lost"


class RunAborted(LeaseLost):
    """A person aborted the run (`Tether.abort`) while this process held it.

    The message says who and why; the run is `aborted` and takes no more writes.
    """

    code = "run_aborted"


class NotFound(TetherError, LookupError):
    """No run, capability or record by that id."""

    code = "not_found"


class StepLimitReached(TetherError):
    """The planner wanted more steps than the run's `max_steps` allows."""

    code = "max_steps_exceeded"


class PlannerGaveUp(TetherError):
    """The planner finished without doing the task (`Proposal(gave_up=True)`)."""

    code = "planner_gave_up"


class PlannerFailed(TetherError):
    """The planner raised instead of proposing: the run ends `failed`.

    Its own message is left out (a planner's error may quote what it was
    shown, secrets included); its type is named.
    """

    code = "planner_failed"


class IntegrityError(TetherError):
    """A record's hash chain or its signed head does not verify."""

    code = "integrity_error"
