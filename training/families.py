"""The family table: name -> module with the DESIGN section 2 contract (lazy imports)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

FAMILIES = {
    "mlp": "training.models.mlp",
    "resnet": "training.models.resnet",
    "decoder": "training.models.decoder",
    "rnn": "training.models.rnn",          # forecaster (KIND "sequence")
    "rnn_lm": "training.models.rnn_lm",    # character-level LM on the same recurrent core (KIND "tokens")
    "mamba": "training.models.mamba",
    "gan": "training.models.gan",              # class-conditional DCGAN (KIND "sample")
    "vae": "training.models.vae",              # convolutional VAE, the decoder is served (KIND "sample")
    "diffusion": "training.models.diffusion",  # UNet denoiser, DDPM/DDIM in training/schedulers (KIND "denoise")
}


def family_module(name: str) -> ModuleType:
    """The module of a family; ValueError names the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])


def preset_names(family: str) -> list[str]:
    """The preset names of a family, read from its module's `PRESETS = {...}` literal without importing
    the module (it imports torch: seconds, where `zooserve train --help` and a wrong --preset need
    milliseconds); a module that builds PRESETS otherwise is imported."""
    module_name = FAMILIES[family]
    names = None if module_name in sys.modules else literal_preset_names(module_name)
    return names if names is not None else list(family_module(family).PRESETS)


def literal_preset_names(module_name: str) -> list[str] | None:
    """The string keys of a top-level `PRESETS = {...}` dict literal in a module's source, or None."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in node.targets)):
            keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            return keys if len(keys) == len(node.value.keys) else None
    return None


def make_config(family: str, preset: str | None = None, **overrides: Any):
    """Config of a family from a preset name plus field overrides."""
    module = family_module(family)
    fields: dict[str, Any] = {}
    if preset is not None:
        if preset not in module.PRESETS:
            raise ValueError(f"unknown preset {preset!r} for {family}; known: {', '.join(module.PRESETS)}")
        fields.update(module.PRESETS[preset])
    fields.update(overrides)
    return module.Config(**fields)


def config_from_dict(family: str, values: dict[str, Any]):
    """Rebuild a Config from config.json; unknown keys are an error, not silently dropped."""
    module = family_module(family)
    known = {f.name for f in dataclasses.fields(module.Config)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"config.json for {family} has unknown fields: {sorted(unknown)}")
    return module.Config(**values)
