"""The on-disk registry: `<root>/<model>/model.json` and immutable `<root>/<model>/<n>/` versions.

Publishing copies into a staging folder, hashes and fsyncs it, then renames it to the next
version number under an exclusive lock on `<root>/<model>/.lock`, so a reader never sees half a
version and two publishers never get the same number. `model.json` is replaced atomically under
the same lock, each write checked against the versions on disk and one revision higher than the
last (a writer holding an older revision gets Conflict); the routing and rollout changes
themselves are pure functions in `rollout_ops`. `<root>/<model>/.rollout-lease` lets one rollout
controller at a time drive a model. Files in the model folder whose names start with '.' (the
lock, the lease, temporary files) are never versions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import EllipsisType

from pydantic import BaseModel, ValidationError

from . import rollout_ops as ops
from .errors import Conflict, FamilyMismatch, IntegrityError, NotFound, RegistryError
from .lease import LEASE, Lease, can_take
from .manifest import Manifest, ModelConfig, Signature
from .names import is_valid_name, validate_alias, validate_name
from .routing import Rollout

MANIFEST = "manifest.json"
MODEL_CONFIG = "model.json"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
CHUNK = 1 << 20
_VERSION_RE = re.compile(r"[1-9][0-9]*")


def dump_json(model: BaseModel) -> str:
    """The registry's JSON text of a pydantic model: sorted keys, indent 2, final newline."""
    return json.dumps(model.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename or a new file in it survives a crash."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # some platforms cannot open a directory; the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _copy_and_hash(src: Path, dst: Path) -> str:
    """Copy src to dst, fsync dst, and return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _walk_files(top: Path) -> Iterator[tuple[str, Path]]:
    """Yield (posix relative path, path) of every regular file under top; refuse symlinks."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for entry in sorted(dirnames + filenames):
            path = Path(dirpath) / entry
            rel = path.relative_to(top).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise RegistryError(f"refusing symlink {rel!r} in {top}")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise RegistryError(f"refusing {rel!r} in {top}: not a regular file")
            if stat.S_ISREG(mode):
                yield rel, path


def _replace_file(path: Path, text: str) -> None:
    """Replace `path` atomically: a temporary file in the same folder, fsync, rename, fsync the
    folder. The temporary name starts with '.', so version scanning never mistakes it."""
    tmp = path.parent / f".{path.name.lstrip('.')}.tmp-{uuid.uuid4().hex}"
    try:
        _write_file_durably(tmp, text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _read_model(cls: type[BaseModel], path: Path):
    try:
        return cls.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise RegistryError(f"{path} is not a valid {cls.__name__}: {e}") from e


def _fmt(items) -> str:
    return ", ".join(str(i) for i in items) or "none"


def _check_revision(name: str, stored: int, expected: int | None) -> None:
    """Conflict when a writer's revision is not the one on disk (None: the writer does not care)."""
    if expected is not None and expected != stored:
        raise Conflict(
            f"model.json of {name!r} is at revision {stored}, but this write was based on revision "
            f"{expected}; another writer changed it since: re-read it and apply the change again",
            current=stored, expected=expected,
        )


def _revalidated(cfg: ModelConfig) -> ModelConfig:
    """Run the schema's validators again: edits made in place (cfg.routing.split = ...) skip them."""
    try:
        return ModelConfig.model_validate(cfg.model_dump(mode="json"))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'model.json'}: {err['msg']}" for err in e.errors()
        )
        raise RegistryError(f"refusing to write model.json of {cfg.name!r}: {problems}") from None


def _describe(signature: Signature) -> str:
    """'inputs image FP32 [-1, 8]; outputs logits FP32 [-1, 10]', for error messages."""
    def tensors(specs) -> str:
        return ", ".join(f"{t.name} {t.datatype} {t.shape}" for t in specs) or "none"
    return f"inputs {tensors(signature.inputs)}; outputs {tensors(signature.outputs)}"


def _read_lease(path: Path) -> Lease | None:
    if not path.is_file():
        return None
    try:
        return Lease.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise RegistryError(
            f"rollout lease {path} is not valid JSON {{owner, expires_at}} ({e.error_count()} problem(s)); "
            "delete it once no rollout controller runs"
        ) from None


def _assign(cfg: ModelConfig, new: ModelConfig) -> None:
    """Make `cfg` equal to `new` in place (update_model_config's changes edit their argument)."""
    for field in ModelConfig.model_fields:
        setattr(cfg, field, getattr(new, field))


class Registry:
    """A model registry rooted at a folder (which need not exist yet)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ---- reading -------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Sorted names of the models that have a model.json."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if is_valid_name(p.name) and (p / MODEL_CONFIG).is_file()
        )

    def versions(self, name: str) -> list[int]:
        """Published version numbers of a model, ascending."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise NotFound(
                f"model {name!r} not found in registry {self.root}; models: {_fmt(self.models())}"
            )
        return self._scan_versions(model_dir)

    def version_dir(self, name: str, version: int) -> Path:
        """Folder of one version; NotFound if it does not exist."""
        versions = self.versions(name)
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version}; versions: {_fmt(versions)}")
        return self._model_dir(name) / str(version)

    def manifest(self, name: str, version: int) -> Manifest:
        """The manifest of one version."""
        path = self.version_dir(name, version) / MANIFEST
        if not path.is_file():
            raise IntegrityError(f"{name} version {version} has no {MANIFEST}", [f"missing {MANIFEST}"])
        return _read_model(Manifest, path)

    def model_config(self, name: str) -> ModelConfig:
        """The model.json of a model; NotFound if there is none."""
        path = self._model_dir(name) / MODEL_CONFIG
        if not path.is_file():
            raise NotFound(
                f"model {name!r} not found in registry {self.root} (no {MODEL_CONFIG}); "
                f"models: {_fmt(self.models())}"
            )
        return _read_model(ModelConfig, path)

    def resolve(self, name: str, ref: str | int | None = None) -> int:
        """Version number for a version number, an alias, or None (alias "stable", else newest)."""
        if isinstance(ref, bool):
            raise TypeError(f"version reference must be str, int or None, not {ref!r}")
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, int):
            self.version_dir(name, ref)
            return ref
        if ref is None:
            return self._resolve_default(name)
        return self._resolve_alias(name, validate_alias(ref))

    def verify(self, name: str, version: int) -> None:
        """Re-hash every file of a version; IntegrityError listing each missing, changed or extra file."""
        vdir = self.version_dir(name, version)
        listed = self.manifest(name, version).files
        problems = [self._check_file(vdir, rel, sha) for rel, sha in sorted(listed.items())]
        problems = [p for p in problems if p]
        try:
            present = {rel for rel, _ in _walk_files(vdir)}
        except RegistryError as e:
            problems.append(str(e))
            present = set()
        problems += [f"extra file {rel!r} (not in the manifest)"
                     for rel in sorted(present - set(listed) - {MANIFEST})]
        if problems:
            raise IntegrityError(f"{name} version {version} ({vdir}) failed verification:", problems)

    # ---- writing model.json ----------------------------------------------------------------
    # Every write goes through _write_checked under the model lock: the config is checked (schema,
    # then against the versions on disk), its revision raised by one, and it replaces model.json
    # atomically. A writer that read an older revision is refused with Conflict.

    def write_model_config(self, cfg: ModelConfig, expected_revision: int | None = None) -> ModelConfig:
        """Replace model.json with `cfg` (creating the model if needed) and return what was written.

        `expected_revision`: the revision `cfg` was read at; Conflict if model.json has moved on
        (None: no check, the old last-writer-wins behaviour). The written revision is also set on
        `cfg`, so the caller can write the same object again with expected_revision=cfg.revision."""
        with self._lock(cfg.name, create=True):
            stored = self._stored_revision(cfg.name)
            _check_revision(cfg.name, stored, expected_revision)
            written = self._write_checked(cfg, stored)
        cfg.revision = written.revision
        return written

    def update_model_config(
        self,
        name: str,
        change: Callable[[ModelConfig], None],
        expected_revision: int | None = None,
    ) -> ModelConfig:
        """Read model.json, let `change` edit a copy in place, check and write it, all under one
        lock (so no other writer can slip in between); return the written config."""
        with self._lock(name):
            current = self.model_config(name)
            _check_revision(name, current.revision, expected_revision)
            draft = current.model_copy(deep=True)
            change(draft)
            if draft.name != name:
                raise RegistryError(f"a change to model.json of {name!r} may not rename it to {draft.name!r}")
            return self._write_checked(draft, current.revision)

    def set_alias(
        self, name: str, alias: str, version: int, expected_revision: int | None = None
    ) -> ModelConfig:
        """Point an alias at an existing version."""
        validate_alias(alias)
        return self._apply(name, lambda cfg: ops.set_alias(cfg, alias, version), expected_revision)

    def remove_alias(self, name: str, alias: str, expected_revision: int | None = None) -> ModelConfig:
        """Drop an alias; refused while the split, the shadow or a running rollout uses it."""
        validate_alias(alias)
        return self._apply(name, lambda cfg: ops.remove_alias(cfg, alias), expected_revision)

    def set_split(
        self,
        name: str,
        weights: dict[str, int],
        sticky_key: str | None | EllipsisType = ...,
        expected_revision: int | None = None,
    ) -> ModelConfig:
        """Set the traffic split over aliases (weights >= 0, at least one positive);
        `sticky_key` ... keeps the sticky key, None clears it, a header name sets it."""
        ops.check_split_weights(weights)
        return self._apply(name, lambda cfg: ops.set_split(cfg, weights, sticky_key), expected_revision)

    def set_sticky_key(
        self, name: str, header: str | None, expected_revision: int | None = None
    ) -> ModelConfig:
        """Pin each caller to one alias of the split by this request header (None: no pinning)."""
        return self._apply(name, lambda cfg: ops.set_sticky_key(cfg, header), expected_revision)

    def set_shadow(
        self, name: str, alias: str | None, percent: float | None, expected_revision: int | None = None
    ) -> ModelConfig:
        """Copy `percent` of the primary's requests to `alias` (same signature required); None: off."""
        return self._apply(name, lambda cfg: ops.set_shadow(cfg, alias, percent), expected_revision)

    # ---- publishing -----------------------------------------------------------------------

    def publish(self, name: str, src_dir: str | os.PathLike, force: bool = False) -> int:
        """Copy src_dir into the next version of `name` and return its number. A package of another
        family than the model's is refused (FamilyMismatch) unless `force`; another kind always is."""
        model_dir = self._model_dir(name)
        src = Path(src_dir)
        manifest = self._read_source_manifest(src)
        if model_dir.resolve().is_relative_to(src.resolve()):
            raise RegistryError(f"cannot publish {src}: it contains the registry folder {model_dir}")
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = model_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            staging.mkdir()
            files = self._stage_files(src, staging)
            self._check_source_files(src, manifest, files)
            with self._lock(name, create=True):
                return self._commit(name, staging, manifest, files, force)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ---- rollouts --------------------------------------------------------------------------

    def start_rollout(
        self, name: str, rollout: Rollout, now: float, reason: str = "", expected_revision: int | None = None
    ) -> ModelConfig:
        """Start a rollout of rollout.canary against rollout.stable at steps[0]; refused while
        another one runs, or when both aliases point at the same version."""
        return self._apply(name, lambda cfg: ops.start_rollout(cfg, rollout, now, reason), expected_revision)

    def rollout_step(
        self, name: str, step: int, reason: str, now: float, expected_revision: int | None = None
    ) -> ModelConfig:
        """Move the running rollout to steps[step]; the split follows."""
        return self._apply(name, lambda cfg: ops.rollout_step(cfg, step, reason, now), expected_revision)

    def rollout_hold(
        self, name: str, reason: str, now: float, expected_revision: int | None = None
    ) -> ModelConfig:
        """Record a `held` decision and start a new analysis window; the split stays."""
        return self._apply(name, lambda cfg: ops.rollout_hold(cfg, reason, now), expected_revision)

    def promote(
        self, name: str, reason: str, now: float, canary: str | None = None,
        expected_revision: int | None = None,
    ) -> ModelConfig:
        """Point the stable alias at the canary's version and route everything to it.

        `canary`: default the running rollout's canary, else alias "canary"."""
        return self._apply(name, lambda cfg: ops.promote(cfg, reason, now, canary), expected_revision)

    def rollback(
        self, name: str, reason: str, now: float, canary: str | None = None,
        expected_revision: int | None = None,
    ) -> ModelConfig:
        """Route everything to the stable alias at once; the canary alias stays for inspection."""
        return self._apply(name, lambda cfg: ops.rollback(cfg, reason, now, canary), expected_revision)

    def abort_rollout(
        self, name: str, reason: str, now: float, expected_revision: int | None = None
    ) -> ModelConfig:
        """Stop the running rollout without a verdict; everything back to the stable alias."""
        return self._apply(name, lambda cfg: ops.abort_rollout(cfg, reason, now), expected_revision)

    # ---- the rollout lease -----------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl_s: float, now: float | None = None) -> bool:
        """Take or renew `<model>/.rollout-lease` for `owner` until now + ttl_s; False while
        another owner holds an unexpired lease."""
        if not isinstance(owner, str) or not owner:
            raise RegistryError(f"lease owner must be a non-empty string, got {owner!r}")
        if not ttl_s > 0:
            raise RegistryError(f"lease ttl_s must be > 0 seconds, got {ttl_s!r}")
        now = time.time() if now is None else now
        with self._lock(name):
            path = self._model_dir(name) / LEASE
            if not can_take(_read_lease(path), owner, now):
                return False
            _replace_file(path, dump_json(Lease(owner=owner, expires_at=now + ttl_s)))
            return True

    def release_lease(self, name: str, owner: str) -> bool:
        """Drop the lease if `owner` holds it (expired or not); True if it was dropped. Another
        owner's lease is left in place."""
        with self._lock(name):
            path = self._model_dir(name) / LEASE
            current = _read_lease(path)
            if current is None or current.owner != owner:
                return False
            path.unlink()
            fsync_dir(path.parent)
            return True

    def lease(self, name: str) -> Lease | None:
        """The lease as stored (possibly expired), or None; NotFound for an unknown model."""
        self.versions(name)
        return _read_lease(self._model_dir(name) / LEASE)

    # ---- internals -----------------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    @staticmethod
    def _scan_versions(model_dir: Path) -> list[int]:
        if not model_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in model_dir.iterdir() if _VERSION_RE.fullmatch(p.name) and p.is_dir()
        )

    @contextlib.contextmanager
    def _lock(self, name: str, create: bool = False) -> Iterator[None]:
        """Exclusive flock on <root>/<name>/.lock (not reentrant: take it once per operation)."""
        model_dir = self._model_dir(name)
        if create:
            model_dir.mkdir(parents=True, exist_ok=True)
        elif not model_dir.is_dir():
            self.versions(name)  # raises NotFound naming the models that exist
        fd = os.open(model_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _apply(
        self, name: str, op: Callable[[ModelConfig], ModelConfig], expected_revision: int | None
    ) -> ModelConfig:
        """update_model_config with one of rollout_ops' pure transformations."""
        return self.update_model_config(name, lambda cfg: _assign(cfg, op(cfg)), expected_revision)

    def _stored_revision(self, name: str) -> int:
        """Revision of model.json on disk; 0 when there is none. Read leniently, so that a damaged
        model.json can still be replaced by write_model_config."""
        path = self._model_dir(name) / MODEL_CONFIG
        try:
            revision = json.loads(path.read_bytes()).get("revision", 0)
        except (OSError, ValueError, AttributeError):
            return 0
        return revision if isinstance(revision, int) and not isinstance(revision, bool) and revision >= 0 else 0

    def _write_checked(self, cfg: ModelConfig, stored_revision: int) -> ModelConfig:
        """Under the model lock: check `cfg`, write it as revision stored_revision + 1, return it."""
        self._check_references(cfg)
        checked = _revalidated(cfg)
        self._check_against_versions(checked)
        written = checked.model_copy(update={"revision": stored_revision + 1})
        self._replace_model_config(written)
        return written

    @staticmethod
    def _check_references(cfg: ModelConfig) -> None:
        """Split and shadow must name known aliases, with weights the split can hold (checked
        before the schema, whose messages are less direct)."""
        routing = cfg.routing
        if routing.split:
            ops.check_split_weights(routing.split)
        for alias in routing.split:
            ops.require_alias(cfg, alias)
        if routing.shadow is not None:
            ops.require_alias(cfg, routing.shadow.alias, "shadow alias")

    def _check_against_versions(self, cfg: ModelConfig) -> None:
        """Refuse aliases naming missing versions, a running rollout that no longer matches its
        aliases, and a shadow whose signature differs from the primary's."""
        versions = self._scan_versions(self._model_dir(cfg.name))
        ops.check_alias_versions(cfg, versions)
        ops.check_running_rollout(cfg)
        self._check_shadow_signature(cfg, versions)

    def _check_shadow_signature(self, cfg: ModelConfig, versions: list[int]) -> None:
        shadow = cfg.routing.shadow
        if shadow is None:
            return
        shadow_version = cfg.routing.aliases[shadow.alias]
        shadow_signature = self.manifest(cfg.name, shadow_version).signature
        for version in _primary_versions(cfg, versions):
            signature = self.manifest(cfg.name, version).signature
            if signature != shadow_signature:
                raise RegistryError(
                    f"shadow {shadow.alias!r} of {cfg.name!r} is version {shadow_version} with "
                    f"{_describe(shadow_signature)}, but primary version {version} has {_describe(signature)}; "
                    "a shadow must take and return the same tensors as the versions it shadows"
                )

    def _replace_model_config(self, cfg: ModelConfig) -> None:
        model_dir = self._model_dir(cfg.name)
        model_dir.mkdir(parents=True, exist_ok=True)
        _replace_file(model_dir / MODEL_CONFIG, dump_json(cfg))

    def _resolve_default(self, name: str) -> int:
        versions = self.versions(name)
        config_path = self._model_dir(name) / MODEL_CONFIG
        if config_path.is_file() and "stable" in self.model_config(name).routing.aliases:
            return self._resolve_alias(name, "stable")
        if not versions:
            raise NotFound(f"model {name!r} has no published versions")
        return versions[-1]

    def _resolve_alias(self, name: str, alias: str) -> int:
        aliases = self.model_config(name).routing.aliases
        if alias not in aliases:
            raise NotFound(f"model {name!r} has no alias {alias!r}; aliases: {_fmt(sorted(aliases))}")
        version = aliases[alias]
        versions = self.versions(name)
        if version not in versions:
            raise NotFound(
                f"alias {alias!r} of {name!r} points at version {version}, which does not exist; "
                f"versions: {_fmt(versions)}"
            )
        return version

    @staticmethod
    def _check_file(vdir: Path, rel: str, expected: str) -> str | None:
        """A problem line for one listed file, or None if it matches."""
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            return f"unsafe path {rel!r} in the manifest"
        path = vdir / rel
        if path.is_symlink() or not path.is_file():
            return f"missing file {rel!r}"
        actual = sha256_file(path)
        if actual != expected:
            return f"hash mismatch {rel!r}: manifest {expected}, file {actual}"
        return None

    @staticmethod
    def _read_source_manifest(src: Path) -> Manifest:
        if not src.is_dir():
            raise RegistryError(f"cannot publish {src}: not a folder")
        path = src / MANIFEST
        if not path.is_file():
            raise RegistryError(f"cannot publish {src}: no {MANIFEST}")
        return _read_model(Manifest, path)

    @staticmethod
    def _stage_files(src: Path, staging: Path) -> dict[str, str]:
        """Copy every file of src except manifest.json into staging; return {path: sha256}."""
        files: dict[str, str] = {}
        for rel, path in _walk_files(src):
            if rel == MANIFEST:
                continue
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            files[rel] = _copy_and_hash(path, dst)
        for d in sorted({(staging / rel).parent for rel in files}, reverse=True):
            fsync_dir(d)
        return files

    @staticmethod
    def _check_source_files(src: Path, manifest: Manifest, files: dict[str, str]) -> None:
        """Refuse a source whose manifest names files it lacks or lists files that do not match."""
        problems = [f"artifact {f!r} named in the manifest is missing"
                    for f in sorted(set(manifest.artifacts.values()) - set(files))]
        if manifest.format not in manifest.artifacts:
            problems.append(f"format {manifest.format!r} has no entry in artifacts {manifest.artifacts}")
        if manifest.tokenizer and manifest.tokenizer not in files:
            problems.append(f"tokenizer {manifest.tokenizer!r} named in the manifest is missing")
        if manifest.files:  # a version folder from another registry: its hashes must still hold
            problems += [f"missing file {rel!r}" for rel in sorted(set(manifest.files) - set(files))]
            problems += [f"extra file {rel!r} (not in the manifest)"
                         for rel in sorted(set(files) - set(manifest.files))]
            problems += [f"hash mismatch {rel!r}" for rel in sorted(set(files) & set(manifest.files))
                         if files[rel] != manifest.files[rel]]
        if problems:
            raise IntegrityError(f"cannot publish {src}:", problems)

    def _commit(self, name: str, staging: Path, manifest: Manifest, files: dict[str, str], force: bool) -> int:
        """Under the model lock: number the version, write its manifest, rename it into place."""
        model_dir = self._model_dir(name)
        config_path = model_dir / MODEL_CONFIG
        cfg = self.model_config(name) if config_path.is_file() else None
        if cfg is not None:
            _check_fits(cfg, manifest, force)
        version = max(self._scan_versions(model_dir), default=0) + 1
        final = manifest.model_copy(update={"name": name, "version": version, "files": files})
        _write_file_durably(staging / MANIFEST, dump_json(final))
        fsync_dir(staging)
        os.rename(staging, model_dir / str(version))
        fsync_dir(model_dir)
        if cfg is None:
            self._write_checked(ModelConfig(name=name, family=manifest.family, kind=manifest.kind), 0)
        return version


def _check_fits(cfg: ModelConfig, manifest: Manifest, force: bool) -> None:
    """Refuse a version of another kind than the model's, or (unless forced) of another family."""
    if cfg.kind != manifest.kind:
        raise RegistryError(
            f"cannot publish a {manifest.kind!r} version into {cfg.name!r}, whose kind is {cfg.kind!r}"
        )
    if cfg.family != manifest.family and not force:
        raise FamilyMismatch(
            f"cannot publish a {manifest.family!r} package into {cfg.name!r}, whose family is {cfg.family!r}; "
            "publish it under another name, or force it (registry publish --force)"
        )


def _primary_versions(cfg: ModelConfig, versions: list[int]) -> list[int]:
    """Versions that answer requests naming no version: each one the split routes to, else the
    `stable` alias's, else the newest (as `Registry.resolve` picks)."""
    aliases = cfg.routing.aliases
    if cfg.routing.split:
        return sorted({aliases[a] for a, weight in cfg.routing.split.items() if weight > 0})
    if ops.STABLE in aliases:
        return [aliases[ops.STABLE]]
    return versions[-1:]
