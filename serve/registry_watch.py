"""The server follows its registry by itself: a newly published version, a changed model.json
(aliases, split, sticky key, shadow, batching, version policy) or a new model is applied within
about one poll interval, with no restart and no admin call.

A short poll of stat() results, not inotify: the registry of a fleet sits on a shared volume
(DESIGN.md section 9), where inotify never hears of another machine's writes. Each model costs
one stat of model.json and one listing of its folder per poll. Publishing renames a finished
version into place and model.json is replaced atomically, so whatever a poll sees is whole.

A registry root that cannot be read (renamed away, removed, an unmounted volume, no permission)
is an outage of the registry, not a removal of its models: the loaded versions keep serving,
the watch says so once and applies whatever changed once the root is back.
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
        self.unreadable: str | None = None   # why the root cannot be read now, None while it can

    def snapshot(self) -> dict[str, Fingerprint]:
        """Each model's fingerprint; OSError when the root cannot be read, or was moved or replaced
        while this looked (a model seen missing then is the root's outage, not the model's)."""
        root, wanted = self.repository.registry.root, self.repository.settings.models
        before = os.stat(root)
        found = {}
        for entry in os.scandir(root):
            if is_valid_name(entry.name) and (wanted is None or entry.name in wanted):
                try:
                    fingerprint = model_fingerprint(Path(entry.path))
                except OSError:          # this model's folder cannot be read: taken as it was
                    fingerprint = self.seen.get(entry.name)
                if fingerprint is not None:
                    found[entry.name] = fingerprint
        after = os.stat(root)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise FileNotFoundError(f"registry root {root} was replaced during the poll")
        return found

    def prime(self) -> None:
        """Take the registry as it is now as seen (called right before the start-up load)."""
        self.seen = self._readable_snapshot() or {}

    def _readable_snapshot(self) -> dict[str, Fingerprint] | None:
        """The snapshot, or None while the root cannot be read (said once when that starts and once
        when it ends: a poll every half second must not fill the log)."""
        try:
            found = self.snapshot()
        except OSError as exc:
            if self.unreadable is None:
                log.error("registry root cannot be read (%s): the loaded versions keep serving; changes apply "
                          "once it is back", exc)
            self.unreadable = str(exc)
            return None
        if self.unreadable is not None:
            log.info("registry root is readable again: applying what changed meanwhile")
            self.unreadable = None
        return found

    async def poll_once(self) -> None:
        now = await asyncio.to_thread(self._readable_snapshot)
        if now is None:
            return
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
            elif name in repo.tables or name in repo.config_errors:
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
