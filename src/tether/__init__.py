"""tether: the runtime control plane for production AI agents.

An agent decides what to do; tether decides whether it may, does it safely,
and records everything.
"""

from tether._version import __version__
from tether.agent import ScriptedPlanner
from tether.app import Run, Tether
from tether.capability import CallContext, Capability, Effect, Idempotency, capability
from tether.errors import (
    ApprovalClosed,
    ApprovalRequired,
    BreakerOpen,
    CapabilityFailed,
    ConfigError,
    Denied,
    IdempotencyConflict,
    IllegalTransition,
    InDoubt,
    IntegrityError,
    InvalidKey,
    InvalidOutput,
    KeyInUse,
    LeaseLost,
    LimitExceeded,
    NotAllowedToApprove,
    NotFound,
    PreconditionFailed,
    Refused,
    RunAborted,
    StepTimeout,
    StoreError,
    TetherError,
    UsageError,
    ValidationFailed,
)
from tether.plan import Admission, AdmissionStatus, PlanStep
from tether.policy import Decision, DecisionRequest, Policy, Verdict
from tether.principal import Principal
from tether.record import Outcome, OutcomeStatus, Secret, VerifyReport
from tether.run import RunState

__all__ = [
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
