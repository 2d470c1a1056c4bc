"""zooserve's model registry: versioned, hashed model folders with aliases and traffic splits.

Standard library and pydantic only; docs/architecture.md describes the on-disk contract.
"""

from .errors import Conflict, IntegrityError, InvalidName, NotFound, RegistryError
from .lease import Lease
from .manifest import (
    Batching,
    InstanceGroup,
    Generation,
    Lineage,
    Manifest,
    ModelConfig,
    ParityReport,
    Signature,
    TensorSpec,
    VersionPolicy,
)
from .routing import Rollout, RolloutEvent, RolloutStatus, Routing, Shadow
from .names import is_valid_name, validate_alias, validate_name
from .store import MANIFEST, MODEL_CONFIG, Registry, dump_json, sha256_file

__all__ = [
    "MANIFEST",
    "MODEL_CONFIG",
    "Batching",
    "InstanceGroup",
    "Conflict",
    "Generation",
    "IntegrityError",
    "InvalidName",
    "Lease",
    "Lineage",
    "Manifest",
    "ModelConfig",
    "NotFound",
    "ParityReport",
    "Registry",
    "RegistryError",
    "Rollout",
    "RolloutEvent",
    "RolloutStatus",
    "Routing",
    "Shadow",
    "Signature",
    "TensorSpec",
    "VersionPolicy",
    "dump_json",
    "is_valid_name",
    "sha256_file",
    "validate_alias",
    "validate_name",
]
