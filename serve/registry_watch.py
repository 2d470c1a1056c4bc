"""The server follows its registry by itself: a newly published version, a changed model.json
(aliases, split, sticky key, shadow, batching, version policy) or a new model is applied within
about one poll interval, with no restart and no admin call.

A short poll of stat() results, not inotify: the registry of a fleet sits on a shared volume
(DESIGN.md section 9), where inotify never hears of another machine's writes. Each model costs
one stat of model.json and one listing of its folder per poll. Publishing renames a finished
version into place and model.json is replaced atomically, so whatever a poll sees is whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from model_registry import MODEL_CONFIG, is_valid_name
from serve.errors import ServeError
from serve.repository import ModelRepository

log = logging.getLogger("zooserve.watch")

Fingerprint = tuple


def model_fingerprint(model_dir: Path) -> Fingerprint | None:
    """What changes when model.json is replaced or a version is published; None without model.json."""
    try:
        st = os.stat(model_dir / MODEL_CONFIG)
        versions = sorted(e.name for e in os.scandir(model_dir) if e.name.isdigit() and e.is_dir())
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, tuple(versions)


class RegistryWatcher:
    """Polls the registry every `interval_s` and (re)loads what changed, one model at a time."""

    def __init__(self, repository: ModelRepository, interval_s: float):
        self.repository, self.interval_s = repository, interval_s
        self.seen: dict[str, Fingerprint] = {}
        self.applied = 0        # changes applied (for tests and logs)

    def snapshot(self) -> dict[str, Fingerprint]:
        root, wanted = self.repository.registry.root, self.repository.settings.models
        if not root.is_dir():
            return {}
        found = {}
        for entry in os.scandir(root):
            if is_valid_name(entry.name) and (wanted is None or entry.name in wanted):
                fingerprint = model_fingerprint(Path(entry.path))
                if fingerprint is not None:
                    found[entry.name] = fingerprint
        return found

    def prime(self) -> None:
        """Take the registry as it is now as seen (called right before the start-up load)."""
        self.seen = self.snapshot()

    async def poll_once(self) -> None:
        now = await asyncio.to_thread(self.snapshot)
        for name in sorted(set(self.seen) | set(now)):
            if self.seen.get(name) == now.get(name):
                continue
            self.seen[name] = now.get(name)
            await self._apply(name, now.get(name) is not None)
        self.seen = {n: f for n, f in self.seen.items() if f is not None}

    async def _apply(self, name: str, present: bool) -> None:
        repo = self.repository
        try:
            if present:
                log.info("%s changed in the registry: reloading", name)
                await repo.load_model(name)
            elif name in repo.tables:
                log.info("%s left the registry: draining and unloading", name)
                await repo.unload_model(name)
            self.applied += 1
        except ServeError as exc:            # a bad model.json: the last good routing stays (load_model says why)
            log.error("%s: change not applied: %s", name, exc.message)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad poll
                log.exception("registry poll failed; trying again in %.1f s", self.interval_s)
