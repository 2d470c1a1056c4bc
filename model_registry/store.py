"""The on-disk registry: `<root>/<model>/model.json` and immutable `<root>/<model>/<n>/` versions.

Publishing copies into a staging folder, hashes and fsyncs it, then renames it to the next
version number under an exclusive lock on `<root>/<model>/.lock`, so a reader never sees half a
version and two publishers never get the same number. `model.json` is replaced atomically.
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
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .errors import IntegrityError, NotFound, RegistryError
from .manifest import Manifest, ModelConfig
from .names import is_valid_name, validate_alias, validate_name

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
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


def _read_model(cls: type[BaseModel], path: Path):
    try:
        return cls.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise RegistryError(f"{path} is not a valid {cls.__name__}: {e}") from e


def _fmt(items) -> str:
    return ", ".join(str(i) for i in items) or "none"


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

    # ---- writing -------------------------------------------------------------------------

    def write_model_config(self, cfg: ModelConfig) -> None:
        """Replace model.json atomically (temporary file in the same folder, fsync, rename)."""
        with self._lock(cfg.name, create=True):
            self._replace_model_config(cfg)

    def publish(self, name: str, src_dir: str | os.PathLike) -> int:
        """Copy src_dir into the next version of `name` and return its number."""
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
                return self._commit(name, staging, manifest, files)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at an existing version."""
        validate_alias(alias)
        with self._lock(name):
            self.version_dir(name, version)
            cfg = self.model_config(name)
            cfg.routing.aliases[alias] = version
            self._replace_model_config(cfg)

    def remove_alias(self, name: str, alias: str) -> None:
        """Drop an alias; refused while the traffic split still uses it."""
        validate_alias(alias)
        with self._lock(name):
            cfg = self.model_config(name)
            routing = cfg.routing
            if alias not in routing.aliases:
                raise NotFound(
                    f"model {name!r} has no alias {alias!r}; aliases: {_fmt(sorted(routing.aliases))}"
                )
            if alias in routing.split:
                raise RegistryError(
                    f"alias {alias!r} of {name!r} is used by the split {routing.split}; "
                    "change the split first"
                )
            del routing.aliases[alias]
            self._replace_model_config(cfg)

    def set_split(self, name: str, weights: dict[str, int]) -> None:
        """Set the traffic split over aliases (weights >= 0, at least one positive)."""
        for alias, weight in weights.items():
            validate_alias(alias)
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise RegistryError(
                    f"split weight of {alias!r} must be an integer >= 0, got {weight!r}"
                )
        if sum(weights.values()) <= 0:
            raise RegistryError(f"split weights must sum to more than 0, got {weights}")
        with self._lock(name):
            cfg = self.model_config(name)
            unknown = sorted(set(weights) - set(cfg.routing.aliases))
            if unknown:
                known = _fmt(sorted(cfg.routing.aliases))
                raise NotFound(f"model {name!r} has no alias {_fmt(unknown)}; aliases: {known}")
            cfg.routing.split = dict(weights)
            self._replace_model_config(cfg)

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

    def _replace_model_config(self, cfg: ModelConfig) -> None:
        model_dir = self._model_dir(cfg.name)
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f".{MODEL_CONFIG}.tmp-{uuid.uuid4().hex}"
        try:
            _write_file_durably(tmp, dump_json(cfg))
            os.replace(tmp, model_dir / MODEL_CONFIG)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(model_dir)

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
            _fsync_dir(d)
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

    def _commit(self, name: str, staging: Path, manifest: Manifest, files: dict[str, str]) -> int:
        """Under the model lock: number the version, write its manifest, rename it into place."""
        model_dir = self._model_dir(name)
        config_path = model_dir / MODEL_CONFIG
        cfg = self.model_config(name) if config_path.is_file() else None
        if cfg is not None and cfg.kind != manifest.kind:
            raise RegistryError(
                f"cannot publish a {manifest.kind!r} version into {name!r}, whose kind is {cfg.kind!r}"
            )
        version = max(self._scan_versions(model_dir), default=0) + 1
        final = manifest.model_copy(update={"name": name, "version": version, "files": files})
        _write_file_durably(staging / MANIFEST, dump_json(final))
        _fsync_dir(staging)
        os.rename(staging, model_dir / str(version))
        _fsync_dir(model_dir)
        if cfg is None:
            self._replace_model_config(ModelConfig(name=name, family=manifest.family, kind=manifest.kind))
        return version
