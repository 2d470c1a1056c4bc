"""The rollout lease: `<root>/<model>/.rollout-lease`, so that one rollout controller writes at a time.

The file is JSON {owner, expires_at}; `store.Registry` reads and replaces it under the model lock.
A controller renews its lease well before `expires_at`; one that dies simply lets it expire, and
another controller may then take over. The lease is advisory: the registry's verbs do not check it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

LEASE = ".rollout-lease"


class Lease(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1)
    expires_at: float          # unix time


def can_take(current: Lease | None, owner: str, now: float) -> bool:
    """Whether `owner` may take (or renew) the lease: none held, expired, or held by `owner`."""
    return current is None or current.expires_at <= now or current.owner == owner
