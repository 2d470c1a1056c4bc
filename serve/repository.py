"""The server's view of the registry: which versions are loaded, their state, and resolution
of a request's (model, version-or-alias) to an engine.

Loading verifies every hash, opens the runtime and replays the golden pair; a version that
fails any step is UNAVAILABLE with the reason, and whatever was serving keeps serving. A reload
loads new versions beside the old ones, swaps the table, then drains the versions it dropped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from model_registry import ModelConfig, Registry, RegistryError
from serve.engines.base import Engine
from serve.engines.factory import make_token_engine
from serve.engines.sample import make_generative_engine
from serve.engines.sequence import SequenceEngine, SequenceRuntime, artifact_names
from serve.engines.stateless import StatelessEngine
from serve.golden import check_golden
from serve.errors import ServeError, not_found, unavailable
from serve.metrics import Metrics
from serve.runtimes import open_runtime, with_split_prefill
from serve.sample_request import GENERATIVE_KINDS
from serve.sequence_store import SequenceStore
from serve.settings import ServeSettings

log = logging.getLogger("zooserve.repository")

# kinds with an engine
ENGINE_KINDS = {"classify", "tokens", "sequence", "sample", "denoise"}


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

    async def load_all(self) -> None:
        """Load every model of the registry, or those `settings.models` names (start-up)."""
        wanted = self.settings.models
        for name in self.registry.models():
            if wanted is None or name in wanted:
                await self.load_model(name)
        self.loaded = True

    async def load_model(self, name: str) -> None:
        """(Re)load one model: new versions come up beside the old, then the old ones drain."""
        try:
            cfg = self.registry.model_config(name)
            wanted = versions_to_load(cfg, self.registry.versions(name))
        except RegistryError as exc:
            raise not_found(str(exc)) from exc
        old = self.tables.get(name, {})
        new: dict[int, LoadedVersion] = {}
        for version in wanted:
            if version in old and old[version].state == State.READY:
                new[version] = old[version]
                continue
            new[version] = await asyncio.to_thread(self._open_version, cfg, version)
            if new[version].engine is not None:
                new[version].engine.start()
        if any(lv.state != State.READY for v, lv in new.items() if old.get(v) is not lv):
            # a new version failed: whatever was serving keeps serving beside it
            for version, lv in old.items():
                if version not in new and lv.state == State.READY:
                    new[version] = lv
        for version, lv in old.items():
            if version not in new and self._live_sequences(lv):
                # its stateful sequences are pinned to it: it serves them until they end or expire
                new[version] = lv
                self._retire_when_idle(name, version)
        self.configs[name], self.tables[name], self.wanted[name] = cfg, new, set(wanted)
        for version, lv in old.items():
            if new.get(version) is not lv:
                await self._close_version(lv)

    async def unload_model(self, name: str) -> None:
        """Stop routing to the model, drain its in-flight requests, release it."""
        if name not in self.tables:
            raise not_found(f"model {name!r} is not loaded")
        table = self.tables.pop(name)
        self.configs.pop(name, None)
        self.wanted.pop(name, None)
        for lv in table.values():
            await self._close_version(lv)

    async def close(self) -> None:
        for task in list(self._retiring.values()):
            task.cancel()
        for name in list(self.tables):
            await self.unload_model(name)

    @staticmethod
    def _live_sequences(lv: LoadedVersion) -> int:
        """Live stateful sequences pinned to a version (0 for kinds without them)."""
        store = getattr(lv.engine, "store", None)
        return store.counts(lv.version)[0] if store is not None and lv.state == State.READY else 0

    def _retire_when_idle(self, name: str, version: int) -> None:
        self.tables[name][version].reason = "retiring: serves its live sequences until they end or expire"
        if (name, version) not in self._retiring:
            self._retiring[(name, version)] = asyncio.get_running_loop().create_task(self._retire(name, version))

    async def _retire(self, name: str, version: int) -> None:
        """Unload a version the policy dropped once its last live sequence ends or expires; a
        reload that wants it again, or an unload of the model, takes it over."""
        try:
            log.info("%s/%s is retiring: it serves its %d live sequences until they end or expire",
                     name, version, self._live_sequences(self.tables[name][version]))
            while True:
                lv = self.tables.get(name, {}).get(version)
                if lv is None:
                    return
                if version in self.wanted.get(name, ()):       # loaded again: it stays
                    lv.reason = ""
                    return
                lv.engine.store.expire(version)
                if not self._live_sequences(lv):
                    break
                await asyncio.sleep(min(1.0, self.settings.sequence_idle_timeout_s / 4))
            self.tables[name] = {v: x for v, x in self.tables[name].items() if v != version}
            log.info("%s/%s retired: its last sequence is over", name, version)
            await self._close_version(lv)
        finally:
            self._retiring.pop((name, version), None)

    def _open_version(self, cfg: ModelConfig, version: int) -> LoadedVersion:
        """Verify, open and golden-check one version (runs in a worker thread)."""
        name = cfg.name
        try:
            self.registry.verify(name, version)
            manifest = self.registry.manifest(name, version)
            if manifest.kind not in ENGINE_KINDS:
                raise RuntimeError(f"kind {manifest.kind!r} has no engine in this server yet")
            vdir = self.registry.version_dir(name, version)
            if manifest.kind in GENERATIVE_KINDS:   # parts, a sampling loop, part and end-to-end goldens
                runtime = engine = make_generative_engine(name, version, manifest, vdir, cfg.batching,
                                                          self.settings, self.metrics)
                error = engine.golden_error
            else:
                runtime = open_runtime(vdir, manifest.format, manifest.artifacts[manifest.format],
                                       *artifact_names(manifest),   # the signature's (+ lengths and state)
                                       self.settings.intra_op_threads, self.settings.device)
                if manifest.kind == "sequence":
                    runtime = SequenceRuntime(runtime, manifest, vdir)
                if manifest.kind == "tokens":
                    runtime = with_split_prefill(runtime, manifest, vdir, self.settings.intra_op_threads)
                error = check_golden(manifest, runtime, vdir)
                engine = self._make_engine(cfg, version, manifest, runtime, vdir)
        except Exception as exc:  # noqa: BLE001 - any failure makes this version unavailable, not the server
            log.error("version %s/%s refused: %s", name, version, exc)
            self.metrics.for_model(name, version).ready.set(0)
            return LoadedVersion(name, version, State.UNAVAILABLE, reason=f"{type(exc).__name__}: {exc}")
        log.info("loaded %s/%s (%s %s on %s, golden max abs error %.3g)", name, version, manifest.kind,
                 manifest.format, runtime.device, error)
        engine.metrics.ready.set(1)
        return LoadedVersion(name, version, State.READY, engine=engine, device=runtime.device,
                             prefill=getattr(runtime, "prefill", ""))

    def _make_engine(self, cfg: ModelConfig, version: int, manifest, runtime, vdir: Path):
        if manifest.kind == "sequence":
            store = self.sequence_stores.setdefault(cfg.name, SequenceStore(
                self.settings.sequence_idle_timeout_s, self.settings.max_sequences))
            return SequenceEngine(cfg.name, version, manifest, runtime, cfg.batching, store, self.settings,
                                  self.metrics.for_sequence_model(cfg.name, version))
        if manifest.kind == "tokens":
            return make_token_engine(cfg.name, version, manifest, runtime, vdir, self.settings,
                                     self.metrics.for_token_model(cfg.name, version))
        return StatelessEngine(cfg.name, version, manifest, runtime, cfg.batching,
                               self.metrics.for_model(cfg.name, version))

    async def _close_version(self, lv: LoadedVersion) -> None:
        if lv.engine is None:
            return
        lv.state = State.UNLOADING
        model_metrics = lv.engine.metrics
        await lv.engine.close(self.settings.drain_timeout_s)
        model_metrics.remove()

    def resolve(self, name: str, ref: str | None) -> LoadedVersion:
        """The version a request means: a number, an alias, or (none) `stable` else the newest ready."""
        table = self.tables.get(name)
        if table is None:
            raise not_found(f"unknown model {name!r}; served models: {', '.join(sorted(self.tables)) or 'none'}")
        aliases = self.configs[name].routing.aliases
        if ref is None or ref == "":
            if "stable" in aliases:
                version = aliases["stable"]
            else:
                ready = [v for v, lv in table.items() if lv.state == State.READY]
                if not ready:
                    states = "; ".join(f"version {v} is {lv.state.value}: {lv.reason}" for v, lv in sorted(table.items()))
                    raise unavailable(f"model {name!r} has no ready version ({states or 'no versions'})")
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
            raise not_found(f"version {version} of model {name!r} is not loaded; loaded: "
                            f"{', '.join(map(str, sorted(table))) or 'none'}")
        if lv.state != State.READY:
            raise ServeError(503, f"version {version} of model {name!r} is {lv.state.value}: {lv.reason}")
        return lv

    def index(self) -> list[dict]:
        """Triton's repository index: every model of the registry, with each loaded version's state."""
        rows: list[dict] = []
        for name in self.registry.models():
            table = self.tables.get(name)
            if not table:
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


__all__ = ["ModelRepository", "LoadedVersion", "State", "versions_to_load"]
