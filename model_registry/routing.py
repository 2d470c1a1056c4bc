"""`model.json`'s routing and rollout blocks as pydantic models: what a server routes by, and what
a rollout controller drives and records. Validation here is what one document can check alone
(weights, percentages, steps); checks against the registry (an alias naming a missing version, a
shadow whose signature differs) live in `store.Registry`, which has the versions at hand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Shadow(_Strict):
    """A share of the requests that reach the primary also run on `alias`; only the comparison
    of the two answers is kept (metrics), never the shadow's answer."""

    alias: str
    percent: float = Field(gt=0, le=100)


class Routing(_Strict):
    # alias -> version number
    aliases: dict[str, int] = Field(default_factory=dict)
    # alias -> weight, used when a request names no version (empty: the `stable` alias, else the newest)
    split: dict[str, int] = Field(default_factory=dict)
    # request header whose value pins a caller to one alias of the split (the OpenAI routes also
    # take the request's `user` field when the header is absent)
    sticky_key: str | None = None
    shadow: Shadow | None = None

    @field_validator("split")
    @classmethod
    def _weights(cls, split: dict[str, int]) -> dict[str, int]:
        bad = {a: w for a, w in split.items() if isinstance(w, bool) or w < 0}
        if bad:
            raise ValueError(f"split weights must be integers >= 0, got {bad}")
        if split and sum(split.values()) <= 0:
            raise ValueError(f"split weights must sum to more than 0, got {split}")
        return split

    @field_validator("sticky_key")
    @classmethod
    def _header(cls, key: str | None) -> str | None:
        if key is not None and (not key or not all(c.isalnum() or c in "-_" for c in key)):
            raise ValueError(f"sticky_key must be a header name (letters, digits, '-', '_'), got {key!r}")
        return key.lower() if key else key

    @model_validator(mode="after")
    def _known_aliases(self) -> "Routing":
        unknown = sorted(set(self.split) - set(self.aliases))
        if unknown:
            raise ValueError(f"split names alias(es) {unknown} that are not in aliases {sorted(self.aliases)}")
        if self.shadow is not None and self.shadow.alias not in self.aliases:
            raise ValueError(f"shadow alias {self.shadow.alias!r} is not in aliases {sorted(self.aliases)}")
        return self


RolloutState = Literal["running", "promoted", "rolled_back", "aborted"]


class RolloutEvent(_Strict):
    """One decision of a rollout, as written into `rollout.status.history`."""

    at: float                      # unix time
    event: Literal["started", "stepped", "held", "promoted", "rolled_back", "aborted"]
    step: int                      # index into `steps` when it was taken
    weight: int                    # canary weight after it
    reason: str = ""


class RolloutStatus(_Strict):
    state: RolloutState
    step: int = 0                  # index into `steps` of the weight in force
    weight: int = 0                # canary weight in force
    reason: str = ""               # why the last decision was taken
    started_at: float = 0.0
    updated_at: float = 0.0
    window_started_at: float = 0.0  # start of the analysis window being filled
    stable_version: int = 0        # the versions the rollout compares (fixed at start)
    canary_version: int = 0
    history: list[RolloutEvent] = Field(default_factory=list)


class Rollout(_Strict):
    """A progressive rollout of `canary` against `stable`: the split steps through `steps` (canary
    weight out of 100), each window judged canary against stable before the next step."""

    canary: str
    stable: str = "stable"
    steps: list[int] = Field(default_factory=lambda: [5, 25, 50, 100])
    interval_s: float = Field(30.0, gt=0)
    min_requests: int = Field(50, ge=1)         # per arm and window before a window is judged
    # limits, canary against stable over the window
    max_error_rate_delta: float = Field(0.01, ge=0)
    max_p99_ratio: float = Field(1.5, ge=1)
    min_agreement: float | None = Field(None, ge=0, le=1)   # shadow agreement floor, when a shadow ran
    alpha: float = Field(0.05, gt=0, lt=1)      # significance of each test
    status: RolloutStatus | None = None

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        if not steps:
            raise ValueError("steps must name at least one canary weight")
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"steps are canary weights in 1..100, got {steps}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must increase, got {steps}")
        return steps

    @model_validator(mode="after")
    def _two_aliases(self) -> "Rollout":
        if self.canary == self.stable:
            raise ValueError(f"the canary alias must differ from the stable alias ({self.stable!r})")
        return self
