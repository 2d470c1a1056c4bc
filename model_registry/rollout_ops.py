"""Routing and rollout changes to a `model.json` as pure functions: ModelConfig in, ModelConfig out.

No I/O here: `store.Registry` reads the config under the model lock, applies one of these, checks
the result against the registry (versions exist, shadow signatures match) and writes it. Keeping
the transformations pure lets them be tested alone and keeps every decision of a rollout in one
place. Each function returns a new config and leaves its argument untouched.
"""

from __future__ import annotations

from types import EllipsisType

from .errors import NotFound, RegistryError
from .manifest import ModelConfig
from .names import validate_alias
from .routing import Rollout, RolloutEvent, RolloutStatus, Shadow

STABLE = "stable"
CANARY = "canary"


# ---- checks ------------------------------------------------------------------------------------

def check_split_weights(weights: dict[str, int]) -> None:
    """Refuse alias names and weights the split cannot hold, with a message naming the bad entry."""
    for alias, weight in weights.items():
        validate_alias(alias)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise RegistryError(f"split weight of {alias!r} must be an integer >= 0, got {weight!r}")
    if sum(weights.values()) <= 0:
        raise RegistryError(
            f"split weights must sum to more than 0, got {weights}; give at least one alias a positive weight"
        )


def check_alias_versions(cfg: ModelConfig, versions: list[int]) -> None:
    """Every alias names a published version (the registry's writes, and a server reading a
    model.json edited by hand, apply the same rule)."""
    for alias, version in sorted(cfg.routing.aliases.items()):
        if version not in versions:
            raise NotFound(
                f"alias {alias!r} of {cfg.name!r} would point at version {version}, but model "
                f"{cfg.name!r} has no version {version}; versions: {', '.join(map(str, versions)) or 'none'}; "
                "publish it first or choose an existing version"
            )


def require_alias(cfg: ModelConfig, alias: str, role: str = "alias") -> int:
    """The version `alias` points at; NotFound naming the aliases that exist."""
    aliases = cfg.routing.aliases
    if alias not in aliases:
        known = ", ".join(sorted(aliases)) or "none"
        raise NotFound(f"model {cfg.name!r} has no {role} {alias!r}; aliases: {known}")
    return aliases[alias]


def running_rollout(cfg: ModelConfig) -> Rollout | None:
    """The rollout in progress, or None when none was started or the last one has ended."""
    rollout = cfg.rollout
    if rollout is not None and rollout.status is not None and rollout.status.state == "running":
        return rollout
    return None


def check_running_rollout(cfg: ModelConfig) -> None:
    """Refuse a config whose running rollout no longer matches its aliases: both aliases must
    exist, differ in version, and still point at the versions fixed when it started (moving one
    mid-rollout would compare other versions than the history says)."""
    rollout = running_rollout(cfg)
    if rollout is None:
        return
    status = rollout.status
    stable = require_alias(cfg, rollout.stable, "stable alias (of the running rollout)")
    canary = require_alias(cfg, rollout.canary, "canary alias (of the running rollout)")
    if stable == canary:
        raise RegistryError(
            f"canary alias {rollout.canary!r} and stable alias {rollout.stable!r} of {cfg.name!r} would both "
            f"point at version {stable} during the running rollout; promote, roll back or abort it first"
        )
    if (stable, canary) != (status.stable_version, status.canary_version):
        raise RegistryError(
            f"the running rollout of {cfg.name!r} compares stable version {status.stable_version} with canary "
            f"version {status.canary_version}; {rollout.stable!r} -> {stable} and {rollout.canary!r} -> {canary} "
            "would change that; promote, roll back or abort it first"
        )


def _require_running(cfg: ModelConfig, verb: str) -> Rollout:
    rollout = running_rollout(cfg)
    if rollout is None:
        last = cfg.rollout.status.state if cfg.rollout and cfg.rollout.status else "never started"
        raise RegistryError(
            f"cannot {verb} model {cfg.name!r}: it has no running rollout (last rollout: {last}); "
            "start one first"
        )
    return rollout


def _rollout_aliases(cfg: ModelConfig, canary: str | None) -> tuple[str, str, Rollout | None]:
    """(stable alias, canary alias, running rollout or None) for promote and rollback.

    A running rollout names its own aliases; a `canary` given explicitly must agree with it."""
    rollout = running_rollout(cfg)
    if rollout is None:
        return STABLE, canary or CANARY, None
    if canary is not None and canary != rollout.canary:
        raise RegistryError(
            f"model {cfg.name!r} has a running rollout of canary {rollout.canary!r}, not {canary!r}; "
            f"leave the canary out or name {rollout.canary!r}"
        )
    return rollout.stable, rollout.canary, rollout


# ---- plain routing -----------------------------------------------------------------------------

def set_alias(cfg: ModelConfig, alias: str, version: int) -> ModelConfig:
    """Point `alias` at `version` (the store checks that the version exists)."""
    validate_alias(alias)
    new = cfg.model_copy(deep=True)
    new.routing.aliases[alias] = version
    return new


def remove_alias(cfg: ModelConfig, alias: str) -> ModelConfig:
    """Drop an alias; refused while the split, the shadow or a running rollout uses it."""
    validate_alias(alias)
    require_alias(cfg, alias)
    routing = cfg.routing
    if alias in routing.split:
        raise RegistryError(
            f"alias {alias!r} of {cfg.name!r} is used by the split {routing.split}; change the split first"
        )
    if routing.shadow is not None and routing.shadow.alias == alias:
        raise RegistryError(
            f"alias {alias!r} of {cfg.name!r} is the shadow; turn the shadow off first"
        )
    rollout = running_rollout(cfg)
    if rollout is not None and alias in (rollout.stable, rollout.canary):
        raise RegistryError(
            f"alias {alias!r} of {cfg.name!r} is in the running rollout; abort or finish it first"
        )
    new = cfg.model_copy(deep=True)
    del new.routing.aliases[alias]
    return new


def set_split(
    cfg: ModelConfig, weights: dict[str, int], sticky_key: str | None | EllipsisType = ...
) -> ModelConfig:
    """Replace the split; `sticky_key` ... keeps the sticky key, None clears it, a header sets it."""
    check_split_weights(weights)
    for alias in weights:
        require_alias(cfg, alias)
    new = cfg.model_copy(deep=True)
    new.routing.split = dict(weights)
    if sticky_key is not ...:
        new.routing.sticky_key = sticky_key
    return new


def set_sticky_key(cfg: ModelConfig, header: str | None) -> ModelConfig:
    """Pin callers to one alias of the split by this request header (None: no pinning)."""
    new = cfg.model_copy(deep=True)
    new.routing.sticky_key = header
    return new


def set_shadow(cfg: ModelConfig, alias: str | None, percent: float | None) -> ModelConfig:
    """Copy `percent` of the primary's requests to `alias`; alias None turns the shadow off."""
    new = cfg.model_copy(deep=True)
    if alias is None:
        new.routing.shadow = None
        return new
    validate_alias(alias)
    require_alias(cfg, alias, "shadow alias")
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 100:
        raise RegistryError(f"shadow percent must be a number in (0, 100], got {percent!r}")
    new.routing.shadow = Shadow(alias=alias, percent=float(percent))
    return new


# ---- rollouts ----------------------------------------------------------------------------------

def _split_at(rollout: Rollout, weight: int) -> dict[str, int]:
    return {rollout.stable: 100 - weight, rollout.canary: weight}


def _record(status: RolloutStatus, event: str, reason: str, now: float) -> None:
    """Append one decision to the history and make it the status's latest."""
    status.history.append(
        RolloutEvent(at=now, event=event, step=status.step, weight=status.weight, reason=reason)
    )
    status.reason = reason
    status.updated_at = now


def start_rollout(cfg: ModelConfig, rollout: Rollout, now: float, reason: str = "") -> ModelConfig:
    """Begin a rollout at its first step: the split sends steps[0] percent to the canary."""
    current = running_rollout(cfg)
    if current is not None:
        raise RegistryError(
            f"model {cfg.name!r} already has a running rollout of {current.canary!r} "
            f"(step {current.status.step}, weight {current.status.weight}); abort it or let it finish first"
        )
    stable_version = require_alias(cfg, rollout.stable, "stable alias")
    canary_version = require_alias(cfg, rollout.canary, "canary alias")
    if stable_version == canary_version:
        raise RegistryError(
            f"canary alias {rollout.canary!r} and stable alias {rollout.stable!r} of {cfg.name!r} both point "
            f"at version {stable_version}; point the canary at the new version first"
        )
    weight = rollout.steps[0]
    started = rollout.model_copy(deep=True)
    started.status = RolloutStatus(
        state="running", step=0, weight=weight, started_at=now, window_started_at=now,
        stable_version=stable_version, canary_version=canary_version,
    )
    _record(started.status, "started", reason, now)
    new = cfg.model_copy(deep=True)
    new.rollout = started
    new.routing.split = _split_at(started, weight)
    return new


def rollout_step(cfg: ModelConfig, step: int, reason: str, now: float) -> ModelConfig:
    """Move the running rollout to `steps[step]`; the split follows and a new window starts."""
    rollout = _require_running(cfg, "step the rollout of")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(rollout.steps):
        raise RegistryError(
            f"rollout step of {cfg.name!r} must be an index into steps {rollout.steps} "
            f"(0..{len(rollout.steps) - 1}), got {step!r}"
        )
    new = cfg.model_copy(deep=True)
    status = new.rollout.status
    status.step, status.weight, status.window_started_at = step, rollout.steps[step], now
    _record(status, "stepped", reason, now)
    new.routing.split = _split_at(new.rollout, status.weight)
    return new


def rollout_hold(cfg: ModelConfig, reason: str, now: float) -> ModelConfig:
    """Keep the running rollout at its step and start a new analysis window (split unchanged)."""
    _require_running(cfg, "hold the rollout of")
    new = cfg.model_copy(deep=True)
    status = new.rollout.status
    status.window_started_at = now
    _record(status, "held", reason, now)
    return new


def promote(cfg: ModelConfig, reason: str, now: float, canary: str | None = None) -> ModelConfig:
    """Point the stable alias at the canary's version and send it all traffic.

    A shadow on the canary has nothing left to compare and is cleared; the canary alias stays. A
    running rollout ends `promoted`; without one this is a manual promote of alias `canary`."""
    stable_alias, canary_alias, rollout = _rollout_aliases(cfg, canary)
    version = require_alias(cfg, canary_alias, "canary alias")
    new = cfg.model_copy(deep=True)
    routing = new.routing
    routing.aliases[stable_alias] = version
    routing.split = {stable_alias: 100}
    if routing.shadow is not None and routing.shadow.alias == canary_alias:
        routing.shadow = None
    if rollout is not None:
        _finish(new.rollout.status, "promoted", 100, reason, now)
    return new


def rollback(cfg: ModelConfig, reason: str, now: float, canary: str | None = None) -> ModelConfig:
    """Send all traffic to the stable alias at once; the canary alias is kept for inspection."""
    stable_alias, _, rollout = _rollout_aliases(cfg, canary)
    require_alias(cfg, stable_alias, "stable alias")
    new = cfg.model_copy(deep=True)
    new.routing.split = {stable_alias: 100}
    if rollout is not None:
        _finish(new.rollout.status, "rolled_back", 0, reason, now)
    return new


def abort_rollout(cfg: ModelConfig, reason: str, now: float) -> ModelConfig:
    """Stop the running rollout without a verdict: all traffic back to stable."""
    rollout = _require_running(cfg, "abort the rollout of")
    new = cfg.model_copy(deep=True)
    new.routing.split = {rollout.stable: 100}
    _finish(new.rollout.status, "aborted", 0, reason, now)
    return new


def _finish(status: RolloutStatus, state: str, weight: int, reason: str, now: float) -> None:
    """End a rollout in `state`; `weight` is the canary version's share of traffic after it."""
    status.state = state
    status.weight = weight
    _record(status, state, reason, now)
