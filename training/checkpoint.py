"""Checkpoints: `model.safetensors` + `config.json` (exactly `dataclasses.asdict(config)`) +
`meta.json` (family, metrics, lineage). Never a pickled module.

`load` also reads a registry version folder, where the family comes from `manifest.json`.

The weights are always written from CPU tensors, whatever device the model trained on: a
checkpoint from a GPU exports and serves on a CPU-only machine (`load` maps to its `device`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from training.families import config_from_dict, family_module

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"


def save(directory: str | os.PathLike, model: torch.nn.Module, config: Any, meta: dict[str, Any]) -> Path:
    """Write weights, config and meta (which must name the `family`) into `directory`."""
    if "family" not in meta:
        raise ValueError("meta must name the family")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).cpu()   # a copy: the caller's model stays on its device
    save_model(model, str(out / WEIGHTS))   # handles tied (shared) tensors
    (out / CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n")
    (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return out


def read_family(directory: str | os.PathLike) -> str:
    """The family of a checkpoint folder (meta.json) or a registry version folder (manifest.json)."""
    d = Path(directory)
    for name in (META, "manifest.json"):
        if (d / name).exists():
            return json.loads((d / name).read_text())["family"]
    raise FileNotFoundError(f"{d} has neither {META} nor manifest.json: not a checkpoint")


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META
    return json.loads(path.read_text()) if path.exists() else {}


def load(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """Rebuild `(model, config)` in eval mode from a checkpoint or registry version folder."""
    d = Path(directory)
    family = read_family(d)
    config = config_from_dict(family, json.loads((d / CONFIG).read_text()))
    model = family_module(family).Model(config)
    load_model(model, str(d / WEIGHTS), strict=True, device=str(device))
    return model.to(device).eval(), config
