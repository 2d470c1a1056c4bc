"""The server's view of the registry: which versions are loaded, their state, and resolution
of a request's (model, version-or-alias) to an engine.

Loading verifies every hash, opens the runtime and replays the golden pair; a version that
fails any step is UNAVAILABLE with the reason, and whatever was serving keeps serving. A reload
loads new versions beside the old ones, swaps the table, then drains the versions it dropped.
When every version the policy chooses fails and nothing else serves (a restart onto a corrupt
newest version), the newest version that passes its checks serves in their place.

Reasons shown to clients (answers, the index) name files relative to the registry root: the
unauthenticated routes must not show the server's disk layout (the log keeps the full paths).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from model_registry import ModelConfig, Registry, RegistryError
from model_registry.rollout_ops import check_alias_versions
from serve.engines.base import Engine
from serve.engines.factory import BuildContext, build_engine
from serve.errors import ServeError, not_found, unavailable
from serve.metrics import Metrics
from serve.routing import choose_alias
from serve.sequence_store import SequenceStore
from serve.settings import ServeSettings

log = logging.getLogger("zooserve.repository")

class State(str, Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class LoadedVersion:
    name: str
    version: int
    state: State
    reason: str = ""
    engine: Engine | None = None   # when READY: Stateless, Token, Sequence, Sample or Denoise engine
    device: str = ""               # when READY: "cuda" or "cpu", where its runtime really runs
    prefill: str = ""              # recurrent token models: how prompts run (split around a kernel, or why not)


def versions_to_load(cfg: ModelConfig, available: list[int]) -> list[int]:
    """The version policy applied to what the registry holds; aliased versions always load."""
    policy = cfg.version_policy
    if policy.policy == "all":
        chosen = set(available)
    elif policy.policy == "specific":
        chosen = set(policy.versions) & set(available)
    else:
        chosen = set(available[-policy.num_versions:])
    chosen |= {v for v in cfg.routing.aliases.values() if v in available}
    return sorted(chosen)


def registry_relative(text: str, root: Path) -> str:
    """`text` with the registry root's absolute path (as given, and with links resolved) removed
    from every path under it ("mlp-digits/2/model.onnx") and named "<registry root>" alone."""
    for form in sorted({str(root.absolute()), str(root.resolve())}, key=len, reverse=True):
        at = r"(?<![\w./-])" + re.escape(form)        # not the tail of a longer path
        text = re.sub(at + "/", "", text)
        text = re.sub(at + r"(?![\w.-])", "<registry root>", text)
    return text


def _no_ready_version(name: str, table: dict[int, LoadedVersion]) -> str:
    states = "; ".join(f"version {v} is {lv.state.value}: {lv.reason}" for v, lv in sorted(table.items()))
    return f"model {name!r} has no ready version ({states or 'no versions'})"


def _ready_aliases(cfg: ModelConfig, last: ModelConfig | None,
                   table: dict[int, LoadedVersion]) -> tuple[ModelConfig, list[str]]:
    """`cfg` with each alias whose new version is not READY kept at its last version where that one
    serves: a version takes traffic only once its golden check passed. Returns the notes why."""
    if last is None:
        return cfg, []
    aliases, held = dict(cfg.routing.aliases), []
    for alias, version in cfg.routing.aliases.items():
        lv, before = table.get(version), last.routing.aliases.get(alias)
        if (lv is None or lv.state != State.READY) and before is not None and before != version \
                and before in table and table[before].state == State.READY:
            aliases[alias] = before
            why = lv.reason if lv is not None else "not loaded"
            held.append(f"alias {alias!r} stays at version {before}: version {version} is not ready ({why})")
    if not held:
        return cfg, []
    return cfg.model_copy(update={"routing": cfg.routing.model_copy(update={"aliases": aliases})}), held


class ModelRepository:
    def __init__(self, registry: Registry, settings: ServeSettings, metrics: Metrics):
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.tables: dict[str, dict[int, LoadedVersion]] = {}
        self.configs: dict[str, ModelConfig] = {}
        self.loaded = False      # the start-up load pass has finished
        # model -> its live stateful sequences, shared by its versions (each sequence pinned to one)
        self.sequence_stores: dict[str, SequenceStore] = {}
        self.wanted: dict[str, set[int]] = {}      # model -> versions its policy and aliases load
        # (model, version) -> the task that unloads a dropped version once its live sequences are over
        self._retiring: dict[tuple[str, int], asyncio.Task] = {}
        # model -> why its model.json as it is now on disk is not (wholly) in force: not applied (the last
        # good one is), an alias held back, the version policy's versions refused; for a model with no
        # table, why it could not be loaded at all (strict readiness waits for it)
        self.config_errors: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}   # one (re)load of a model at a time
        # model -> the versions it had when it was unloaded (an admin unload, or the model left the
        # registry), until it is loaded again: its requests and the index say so, as Triton's do
        self.unloaded: dict[str, list[int]] = {}

    async def load_all(self, also: Awaitable | None = None) -> None:
        """Load every model of the registry, or those `settings.models` names (start-up); `also`:
        work started beside the load that must end before the server calls itself loaded."""
        wanted = self.settings.models
        for name in self.registry.models():
            if wanted is None or name in wanted:
                try:
                    await self.load_model(name)
                except ServeError as exc:       # one unreadable model.json does not keep the others down
                    self.config_errors[name] = exc.message
                    log.error("model %s not loaded: %s", name, exc.message)
        if also is not None:
            await also
        self.loaded = True

    async def load_model(self, name: str) -> list[LoadedVersion]:
        """(Re)load one model: new versions come up beside the old, then the old ones drain. An
        alias moved to a version that failed to load stays where it was (and the reason is kept
        in `config_errors`); a model.json that cannot be read leaves the last good one in force.
        Returns the versions this load opened and refused (empty when everything it wanted serves)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            try:
                cfg = self.registry.model_config(name)
                available = self.registry.versions(name)
                check_alias_versions(cfg, available)   # a hand edit: the registry's writes check it too
            except RegistryError as exc:
                message = self.relative(str(exc))
                if name in self.configs:
                    self.config_errors[name] = f"model.json not applied, the last good one stays in force: {message}"
                    log.error("%s: %s", name, self.config_errors[name])
                raise not_found(message) from exc
            return await self._load(name, cfg, versions_to_load(cfg, available), available)

    async def _load(self, name: str, cfg: ModelConfig, wanted: list[int], available: list[int]) -> list[LoadedVersion]:
        old = self.tables.get(name, {})
        last = self.configs.get(name)
        new, refused = await self._open_wanted(cfg, wanted, old, last)
        if refused:
            # a new version failed: whatever was serving keeps serving beside it
            for version, lv in old.items():
                if version not in new and lv.state == State.READY:
                    new[version] = lv
        if wanted and not any(lv.state == State.READY for lv in new.values()):
            refused += await self._fall_back(cfg, wanted, [v for v in available if v not in new], new)
        notes = self._mark_stand_ins(name, wanted, new)
        for version, lv in old.items():
            if version not in new and lv.state == State.READY and name in self.sequence_stores:
                # stateful sequences are pinned to it: it serves them until they end or expire, those
                # a start routed to it just before the swap opens during the grace period included
                new[version] = lv
                self._retire_when_idle(name, version)
        cfg, held = _ready_aliases(cfg, self.configs.get(name), new)
        notes = held + notes
        if notes:
            self.config_errors[name] = "; ".join(notes)
            log.error("%s: %s", name, self.config_errors[name])
        else:
            self.config_errors.pop(name, None)
        self.configs[name], self.tables[name], self.wanted[name] = cfg, new, set(wanted)
        self.unloaded.pop(name, None)
        dropped = [lv for version, lv in old.items() if new.get(version) is not lv]
        if dropped and any(lv.engine is not None for lv in dropped):
            # a request routed just before the swap may not have reached its engine yet (a body
            # still arriving, a stream that starts once the handler returns): give it the grace
            await asyncio.sleep(self.settings.swap_grace_s)
        for lv in dropped:
            await self._close_version(lv)
        return refused

    async def _open_wanted(self, cfg: ModelConfig, wanted: list[int], old: dict[int, LoadedVersion],
                           last: ModelConfig | None) -> tuple[dict[int, LoadedVersion], list[LoadedVersion]]:
        """The wanted versions: those READY already kept (with new batching), the others opened.
        A changed instance_group opens a READY classify version again (its runtime's threads and its
        instances are fixed when it opens); the old engine keeps serving if that fails, and drains
        once the new one serves. Returns (the new table, the versions opened now and refused)."""
        new: dict[int, LoadedVersion] = {}
        refused: list[LoadedVersion] = []
        regroup = last is not None and last.instance_group != cfg.instance_group
        for version in wanted:
            kept = old.get(version) if version in old and old[version].state == State.READY else None
            if kept is not None and not (regroup and kept.engine.manifest.kind == "classify"):
                new[version] = kept
                if last is not None and last.batching != cfg.batching:
                    kept.engine.reconfigure(cfg.batching)
                continue
            new[version] = await self._open_and_start(cfg, version)
            if new[version].state != State.READY:
                refused.append(new[version])
                if kept is not None:        # reopening for the new instance_group failed: the old one serves
                    new[version] = kept
        return new, refused

    async def _open_and_start(self, cfg: ModelConfig, version: int) -> LoadedVersion:
        lv = await asyncio.to_thread(self._open_version, cfg, version)
        if lv.engine is not None:
            lv.engine.start()
        return lv

    async def _fall_back(self, cfg: ModelConfig, wanted: list[int], candidates: list[int],
                         new: dict[int, LoadedVersion]) -> list[LoadedVersion]:
        """Every version the policy chose was refused and nothing else serves: open the other
        versions, newest first, until one passes its checks (added to `new`, as are the refused).
        A model whose newest version is corrupt keeps serving its last good one through a
        restart, as it does through a reload. Returns the versions refused on the way."""
        refused = []
        for version in sorted(candidates, reverse=True):
            lv = await self._open_and_start(cfg, version)
            new[version] = lv
            if lv.state == State.READY:
                log.error("%s: the version policy's version(s) %s were refused; falling back to version %s, "
                          "the newest that passes its checks", cfg.name, _versions(wanted), version)
                return refused
            refused.append(lv)
        if candidates:
            log.error("%s: no version passes its checks; the model serves nothing", cfg.name)
        return refused

    def _mark_stand_ins(self, name: str, wanted: list[int], new: dict[int, LoadedVersion]) -> list[str]:
        """When no version the policy chose serves, the READY versions serving in their place (kept
        from before, or a fall-back) say so in their reason; the note for `config_errors`."""
        chosen_ready = any(new[v].state == State.READY for v in wanted if v in new)
        stand_ins = [v for v, lv in sorted(new.items()) if v not in wanted and lv.state == State.READY]
        for version in wanted:
            if version in new and new[version].state == State.READY:
                new[version].reason = ""        # no longer standing in for another version
        if chosen_ready or not stand_ins:
            return []
        for version in stand_ins:
            new[version].reason = (f"serves in place of version(s) {_versions(wanted)}, which the version "
                                   "policy chose and which failed their checks")
        return [f"version policy not in force: its version(s) {_versions(wanted)} failed their checks, version(s) "
                f"{_versions(stand_ins)} serve in their place; fix or republish, then load again"]

    def refusal_message(self, name: str, refused: list[LoadedVersion]) -> str:
        """What a load that refused versions answers: each refused version and why, and what serves."""
        why = "; ".join(f"version {lv.version} was refused: {lv.reason}" for lv in refused)
        serving = [v for v, lv in sorted(self.tables.get(name, {}).items()) if lv.state == State.READY]
        now = f"version(s) {_versions(serving)} serve" if serving else "no version serves"
        return (f"model {name!r}: {why}. {now}. Fix or republish the refused version(s) in the registry, "
                "then load again")

    def relative(self, text: str) -> str:
        """`text` with paths under the registry root made relative to it (see the module docstring)."""
        return registry_relative(text, self.registry.root)

    async def unload_model(self, name: str) -> None:
        """Stop routing to the model, drain its in-flight requests, release it. A model that could
        not be loaded at all is forgotten (strict readiness no longer waits for it)."""
        if name not in self.tables:
            if self.config_errors.pop(name, None) is not None:
                self.unloaded[name] = []
                return
            if name in self.unloaded:
                raise not_found(f"model {name!r} is already unloaded")
            raise not_found(f"model {name!r} is not loaded")
        table = self.tables.pop(name)
        self.unloaded[name] = sorted(table)
        self.configs.pop(name, None)
        self.wanted.pop(name, None)
        self.config_errors.pop(name, None)
        for lv in table.values():
            await self._close_version(lv)

    async def close(self) -> None:
        for task in list(self._retiring.values()):
            task.cancel()
        for name in list(self.tables):
            await self.unload_model(name)

    def _live_sequences(self, lv: LoadedVersion) -> int:
        """Live stateful sequences pinned to a version (0 for kinds without them)."""
        store = self.sequence_stores.get(lv.name)
        return store.counts(lv.version)[0] if store is not None and lv.state == State.READY else 0

    def _retire_when_idle(self, name: str, version: int) -> None:
        self.tables[name][version].reason = "retiring: serves its live sequences until they end or expire"
        if (name, version) not in self._retiring:
            self._retiring[(name, version)] = asyncio.get_running_loop().create_task(self._retire(name, version))

    async def _retire(self, name: str, version: int) -> None:
        """Unload a version the policy dropped once its last live sequence ends or expires (after the
        swap grace, so that a start routed to it just before the swap is served too); a reload that
        wants it again, or an unload of the model, takes it over."""
        try:
            await asyncio.sleep(self.settings.swap_grace_s)
            announced = False
            while True:
                lv = self.tables.get(name, {}).get(version)
                if lv is None:
                    return
                if version in self.wanted.get(name, ()):       # loaded again: it stays
                    lv.reason = ""
                    return
                self.sequence_stores[name].expire(version)
                live = self._live_sequences(lv)
                if not live:
                    break
                if not announced:
                    log.info("%s/%s is retiring: it serves its %d live sequences until they end or expire",
                             name, version, live)
                    announced = True
                await asyncio.sleep(min(1.0, self.settings.sequence_idle_timeout_s / 4))
            self.tables[name] = {v: x for v, x in self.tables[name].items() if v != version}
            log.info("%s/%s retired: no live sequence left", name, version)
            await self._close_version(lv)
        finally:
            self._retiring.pop((name, version), None)

    def _open_version(self, cfg: ModelConfig, version: int) -> LoadedVersion:
        """Verify, open and golden-check one version (runs in a worker thread)."""
        name = cfg.name
        try:
            self.registry.verify(name, version)
            manifest = self.registry.manifest(name, version)
            built = build_engine(version, manifest, self.registry.version_dir(name, version),
                                 BuildContext(cfg, self.settings, self.metrics, lambda: self._sequence_store(name)))
        except Exception as exc:  # noqa: BLE001 - any failure makes this version unavailable, not the server
            log.error("version %s/%s refused: %s", name, version, exc)
            self.metrics.for_model(name, version).ready.set(0)
            return LoadedVersion(name, version, State.UNAVAILABLE, reason=self.relative(f"{type(exc).__name__}: {exc}"))
        log.info("loaded %s/%s (%s %s on %s, golden max abs error %.3g)", name, version, manifest.kind,
                 manifest.format, built.device, built.golden_error)
        built.engine.metrics.ready.set(1)
        return LoadedVersion(name, version, State.READY, engine=built.engine, device=built.device,
                             prefill=built.prefill)

    def _sequence_store(self, name: str) -> SequenceStore:
        return self.sequence_stores.setdefault(name, SequenceStore(self.settings.sequence_idle_timeout_s,
                                                                   self.settings.max_sequences,
                                                                   workers=self.settings.workers))

    async def _close_version(self, lv: LoadedVersion) -> None:
        if lv.engine is None:
            return
        lv.state = State.UNLOADING
        model_metrics = lv.engine.metrics
        await lv.engine.close(self.settings.drain_timeout_s)
        model_metrics.remove()

    # ---- why a model or version does not serve (the error paths of `resolve`: they may read the registry)

    def _load_hint(self, name: str) -> str:
        return f"POST /v2/repository/models/{name}/load, an admin call"

    def _watch_hint(self) -> str:
        """How the registry watch brings a change in, or that it is off."""
        interval = self.settings.watch_interval_s
        return (f"the registry watch applies it within a poll ({interval:g} s)" if interval > 0 else
                "the registry watch is off on this server (ZOOSERVE_WATCH_INTERVAL_S=0)")

    def _registry_models(self) -> list[str] | None:
        """The registry's models; None while its root cannot be read (an outage lists none)."""
        try:
            return self.registry.models() if self.registry.root.is_dir() else None
        except OSError:
            return None

    def _missing_model(self, name: str) -> ServeError:
        """Why `name` has no table: unknown to the registry (which models it holds), unloaded (how to
        load it), refused at load (why), left out of this server, or not loaded yet."""
        registry_models = self._registry_models()
        if registry_models is None or name not in registry_models:
            listed = registry_models if registry_models is not None else sorted(self.tables)
            where = "the registry's models" if registry_models is not None else "served models"
            return not_found(f"unknown model {name!r}; {where}: {', '.join(listed) or 'none'}")
        if name in self.unloaded:
            again = "; a change to it in the registry loads it too" if self.settings.watch_interval_s > 0 else ""
            return not_found(f"model {name!r} is unloaded (load it with {self._load_hint(name)}{again})")
        if name in self.config_errors:
            return not_found(f"model {name!r} could not be loaded: {self.config_errors[name]}. Fix it in the "
                             f"registry ({self._watch_hint()}) or load it again with {self._load_hint(name)}")
        if self.settings.models is not None and name not in self.settings.models:
            return not_found(f"model {name!r} is in the registry but this server serves only "
                             f"{', '.join(self.settings.models) or 'none'} (its `models` setting)")
        if not self.loaded:
            return unavailable(f"model {name!r} is not loaded yet: the server is starting")
        return not_found(f"model {name!r} is in the registry but not loaded yet: {self._watch_hint()}; or load it "
                         f"now with {self._load_hint(name)}")

    def _missing_version(self, name: str, version: int, table: dict[int, LoadedVersion]) -> ServeError:
        """Why `version` is not in the model's table: the registry has no such version, it was
        published after the last load, or the version policy does not choose it (and no alias does)."""
        loaded = _versions(table)
        try:
            available = self.registry.versions(name)
            cfg = self.registry.model_config(name)
        except (RegistryError, OSError):
            return not_found(f"version {version} of model {name!r} is not loaded; loaded: {loaded}")
        if version not in available:
            return not_found(f"model {name!r} has no version {version}; the registry holds version(s) "
                             f"{_versions(available)}, loaded: {loaded}")
        if version in versions_to_load(cfg, available):
            return not_found(f"version {version} of model {name!r} is in the registry but not loaded yet: it was "
                             f"published after the server last loaded the model; {self._watch_hint()}, or load "
                             f"it now with {self._load_hint(name)}")
        policy = cfg.version_policy
        described = (f"latest {policy.num_versions}" if policy.policy == "latest" else
                     f"specific {_versions(policy.versions)}" if policy.policy == "specific" else policy.policy)
        return not_found(
            f"version {version} of model {name!r} is in the registry but not loaded: model.json's version_policy "
            f"({described}) does not choose it and no alias points at it (loaded: {loaded}). Point an alias at it "
            f"(PUT /v2/repository/models/{name}/aliases/<alias> with {{\"version\": {version}}}, an admin call "
            f"that loads it at once, or `zooserve registry alias {name} <alias> {version}`: "
            f"{self._watch_hint()}) or widen the version policy")

    def resolve(self, name: str, ref: str | None) -> LoadedVersion:
        """The version a request means: a number, an alias, or (none) `stable` else the newest ready."""
        table = self.tables.get(name)
        if table is None:
            raise self._missing_model(name)
        aliases = self.configs[name].routing.aliases
        if ref is None or ref == "":
            if "stable" in aliases:
                version = aliases["stable"]
            else:
                ready = [v for v, lv in table.items() if lv.state == State.READY]
                if not ready:
                    raise unavailable(_no_ready_version(name, table))
                version = max(ready)
        elif ref.isdigit():
            version = int(ref)
        elif ref in aliases:
            version = aliases[ref]
        else:
            raise not_found(f"model {name!r} has no version or alias {ref!r}; aliases: "
                            f"{', '.join(sorted(aliases)) or 'none'}")
        lv = table.get(version)
        if lv is None:
            raise self._missing_version(name, version, table)
        if lv.state != State.READY:
            raise ServeError(503, f"version {version} of model {name!r} is {lv.state.value}: {lv.reason}")
        return lv

    def route(self, name: str, ref: str | None, header: Callable[[str], str | None],
              user: str | None = None) -> tuple[LoadedVersion, str | None]:
        """(the version that answers, the alias that chose it or None) for a request to `name`.
        A request that names a version or an alias gets it; otherwise the split chooses among the
        aliases whose version is ready, by the sticky key when the caller sends one (the header
        `routing.sticky_key`, else `user`: the OpenAI routes' field), by a weighted draw otherwise
        (serve/routing.py). With no split, or none of its aliases ready: `stable`, else the newest."""
        if ref:
            lv = self.resolve(name, ref)
            return lv, None if ref.isdigit() else ref
        cfg = self.configs.get(name)
        if cfg is not None and cfg.routing.split:
            table, aliases = self.tables[name], cfg.routing.aliases
            serving = {a for a in cfg.routing.split
                       if (lv := table.get(aliases.get(a, -1))) is not None and lv.state == State.READY}
            sticky = cfg.routing.sticky_key
            key = (header(sticky) if sticky else None) or user
            alias = choose_alias(cfg.routing.split, serving, key)
            if alias is not None:
                return table[aliases[alias]], alias
        lv = self.resolve(name, None)
        return lv, "stable" if cfg is not None and cfg.routing.aliases.get("stable") == lv.version else None

    def serving(self, name: str, alias: str) -> LoadedVersion | None:
        """The READY version an alias points at now, or None."""
        cfg, table = self.configs.get(name), self.tables.get(name, {})
        version = cfg.routing.aliases.get(alias) if cfg is not None else None
        lv = table.get(version) if version is not None else None
        return lv if lv is not None and lv.state == State.READY else None

    def pinned(self, name: str, version: int, ref: str | None, what: str) -> LoadedVersion:
        """The version a request pinned to `version` (a live sequence's chunk) runs on: a request
        that named an alias or no version follows the pin; one that named another number is refused."""
        if ref is not None and ref.isdigit():
            raise ServeError(400, f"{what} runs on version {version}, not {ref}; send its requests to version "
                                  f"{version} or through an alias")
        lv = self.tables.get(name, {}).get(version)
        if lv is None or lv.state != State.READY:
            raise ServeError(400, f"{what} ran on version {version}, which no longer serves; start it again")
        return lv

    def unready_models(self) -> dict[str, str]:
        """Each model the server serves (loaded, or refused at start-up) that has no READY version,
        with why. Strict readiness asks this on every poll: a walk of the tables, no disk access."""
        unready = {}
        for name, table in self.tables.items():
            if not any(lv.state == State.READY for lv in table.values()):
                unready[name] = _no_ready_version(name, table)
        for name, error in self.config_errors.items():
            if name not in self.tables:
                unready[name] = f"model {name!r} could not be loaded: {error}"
        return unready

    def index(self) -> list[dict]:
        """Triton's repository index: every model of the registry, with each loaded version's state.
        Loaded models are listed even while the registry cannot be read (they keep serving)."""
        try:
            names = set(self.registry.models())
        except OSError:
            names = set()
        rows: list[dict] = []
        for name in sorted(names | set(self.tables)):
            table = self.tables.get(name)
            if not table:
                if name in self.unloaded:       # Triton's row of an unloaded model: each version it had
                    rows.extend({"name": name, **({"version": str(v)} if v is not None else {}),
                                 "state": State.UNAVAILABLE.value, "reason": "unloaded"}
                                for v in self.unloaded[name] or [None])
                elif name in self.config_errors:
                    rows.append({"name": name, "state": State.UNAVAILABLE.value, "reason": self.config_errors[name]})
                else:
                    rows.append({"name": name})
                continue
            for version, lv in sorted(table.items()):
                row = {"name": name, "version": str(version), "state": lv.state.value}
                if lv.reason:
                    row["reason"] = lv.reason
                rows.append(row)
        return rows

    @property
    def in_flight(self) -> int:
        return sum(lv.engine.in_flight for t in self.tables.values() for lv in t.values() if lv.engine)


def _versions(versions) -> str:
    return ", ".join(map(str, sorted(versions))) or "none"


__all__ = ["ModelRepository", "LoadedVersion", "State", "versions_to_load"]
