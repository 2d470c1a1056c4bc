"""The final configuration of a training run (issue 15, section 2): family + preset + an optional
`--config FILE.yaml|.json` + `--set key=value` overrides, merged, typed and validated before
anything trains; `--print-config` shows the result.

    run = resolve("decoder", "tiny", sets=["n_layer=6", "train.lr=3e-3"], config_file="run.yaml")
    run.model           # {field: value} of training.models.decoder.Config, in field order
    run.train           # {field: value} of the recipe's train config (here lm.LMTrainConfig)
    run.model_config()  # the family's Config built from run.model
    run.train_config()  # the recipe's train-config dataclass built from run.train
    print(run.render()) # YAML for --print-config (field order; feeding it back via --config is a no-op)

Precedence, lowest first: dataclass defaults < preset (the family's PRESETS entry for `model`, the
recipe's per-family/per-preset defaults for `train`, e.g. lm.DEFAULT_STEPS) < config file < --set
(applied in order, so a later --set of the same key wins).

--set: `key=value`. A bare key is looked up in the model config, then the train config; a name both
settable sections have is an error asking for `model.` or `train.` (no family has one today: the only
shared names, block_size and vocab_size of the token families, are derived model fields, see below). Values are parsed to the field's annotated
type with pydantic: int, float (3e-4), bool (true/false/1/0, also yes/no/on/off), str, Optional
(`none`/`null` -> None), tuples and lists (`1,2,2` or JSON `[1, 2, 2]`).

Config file (.yaml/.yml via PyYAML, .json): a mapping with optional top-level keys
    model: {field: value}     train: {field: value}
    family: <name>            preset: <name>
`family` and `preset` exist so that `--print-config` output can be fed back: `family` must equal the
run's family; `preset` is used when the caller passes preset=None (the CLI's --preset default should
be None for that) and must equal the caller's preset otherwise. Any other top-level key is an error.

Derived model fields: some Config fields are set by the recipe, not by the user, so a value given for
them would be silently ignored. They are filled here with what the recipe will use where that is known
before training, and giving one a different value is an error naming what to set instead:
    decoder, mamba, rnn_lm: model.block_size = train.block_size; model.vocab_size = train.vocab_size
                            (the BPE target; the model gets the trained tokenizer's size, at most this)
    rnn:                    model.mean, model.std, model.step_std are fit on the training split
For decoder/mamba/rnn_lm a bare `block_size=` / `vocab_size=` therefore means `train.`.

Validation: each value is type-checked on its own; cross-field constraints are the ones the Configs'
__post_init__ already raise on (decoder: n_embd % n_head, n_head % n_kv_head, even head_dim, MoE
n_experts_active; mamba: d_conv >= 2, positive sizes; rnn/rnn_lm: cell in rnn.CELLS), checked by
building the Config (cheap: no model is built). Every error is a `ConfigError` with a one-line message
suitable for `zooserve train: error: <message>`.

How each family's recipe takes its configuration today:

| family         | recipe (module.function)                | train config        | recipe defaults (the "preset" layer of `train`)          |
|----------------|-----------------------------------------|---------------------|----------------------------------------------------------|
| mlp, resnet    | train.train_classifier                  | loop.TrainConfig    | TrainConfig()                                            |
| rnn            | series.train_forecaster                 | loop.TrainConfig    | TrainConfig(**series.TRAIN)                              |
| decoder, mamba | lm.train_token_family                   | lm.LMTrainConfig    | steps: DEFAULT_STEPS["family/preset"], else [preset], else FALLBACK_STEPS |
| rnn_lm         | lm.train_token_family                   | lm.LMTrainConfig    | as decoder, plus vocab_size=rnn_lm.Config.vocab_size (260, passed by train.train) |
| gan            | generative.train_generative             | gan.GANTrainConfig  | generative.train_config: GANTrainConfig(steps=1500)      |
| vae, diffusion | generative.train_generative             | loop.TrainConfig    | generative.train_config(family, preset)                  |

How overrides reach those functions today:
- train_classifier(family, preset, out_dir, train_cfg=None, progress): a whole TrainConfig; the model
  Config is make_config(family, preset), no model overrides.
- train_forecaster(family, preset, out_dir, train_cfg=None, progress, **overrides): a whole TrainConfig;
  **overrides are model Config fields (make_config(family, preset, **overrides)).
- train_token_family(family, preset, out_dir, progress, data, tokenizer_file, train_cfg=None,
  model_config=None, run_dir=None, resume=False): a whole LMTrainConfig (`seed` also seeds the corpus
  split and torch) and the family's Config, whose vocab_size (replaced by the trained tokenizer's size,
  at most the BPE target) and block_size must equal the train config's, as resolved here; a run folder
  with resume (metrics.jsonl, run-state checkpoints, the run's tokenizer). Its older keywords (steps,
  seed, vocab_size, block_size, **LMTrainConfig fields, the model the preset's) still work.
- train_generative(family, preset, out_dir, progress, eval_cfg=EvalConfig(), train_cfg=None): a whole
  train config; the model Config is make_config(family, preset), no model overrides.

training.train.train(family, preset, out_dir, progress), the dispatcher the CLI calls, passes none of
these on today, and generative.EvalConfig (sample budget of the judge) is not part of `train` here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

SECTIONS = ("model", "train")
FILE_KEYS = ("family", "preset", "model", "train")
DEFAULT_PRESET = "tiny"   # the CLI's --preset default; every family has it
TOKEN_FAMILIES = ("decoder", "mamba", "rnn_lm")
DATA_FIT = "fit on the training split by the recipe; it cannot be set"
# derived model field -> the train field it is taken from (str) or DATA_FIT
DERIVED: dict[str, dict[str, str]] = {
    **{family: {"block_size": "block_size", "vocab_size": "vocab_size"} for family in TOKEN_FAMILIES},
    "rnn": {"mean": DATA_FIT, "std": DATA_FIT, "step_std": DATA_FIT},
    # table mode (--data): the feature count and the standardisation come from the training split
    "mlp": {"n_features": DATA_FIT, "feature_mean": DATA_FIT, "feature_std": DATA_FIT},
}
# model fields that --data decides for a family (training/user_data.py): set by hand with --data,
# they would be replaced, so that is refused (training/cli.py)
DATA_DECIDES = {"mlp": ("n_classes", "n_features", "feature_mean", "feature_std"),
                "resnet": ("n_classes", "in_channels", "image_size", "input_scale")}


class ConfigError(ValueError):
    """A configuration that cannot be resolved; str() is one line for `zooserve train: error: ...`."""


@dataclass(frozen=True)
class RunConfig:
    family: str
    preset: str
    model: dict[str, Any]   # the family's Config fields, in field order
    train: dict[str, Any]   # the recipe's train-config fields, in field order

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists), key order: family, preset, model, train."""
        return {"family": self.family, "preset": self.preset,
                "model": _plain(self.model), "train": _plain(self.train)}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def render(self) -> str:
        """YAML for --print-config, field order, with a comment on each derived model field."""
        import yaml

        lines = [f"# zooserve train {self.family}: resolved configuration (--config accepts this file)"]
        for name, source in DERIVED.get(self.family, {}).items():
            note = DATA_FIT.split(";")[0] if source == DATA_FIT else f"= train.{source}"
            lines.append(f"# model.{name}: {note}")

        class Dumper(yaml.SafeDumper):   # block mappings, lists inline: `channel_mult: [1, 2, 2]`
            pass

        Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
        body = yaml.dump(self.as_dict(), Dumper=Dumper, sort_keys=False, default_flow_style=False)
        return "\n".join(lines) + "\n" + body

    def model_config(self):
        """The family's Config (what make_config would give for these values)."""
        from training.families import family_module

        return family_module(self.family).Config(**self.model)

    def train_config(self):
        """The recipe's train-config dataclass built from `train`."""
        return train_config_class(self.family)(**self.train)


def recipe_train_config(family: str, preset: str):
    """The train config the family's recipe uses for `preset` today, with no overrides."""
    if family in ("mlp", "resnet"):
        from training import loop

        return loop.TrainConfig()
    if family == "rnn":
        from training import loop, series

        return loop.TrainConfig(**series.TRAIN)
    if family in TOKEN_FAMILIES:
        from training import lm

        steps = lm.DEFAULT_STEPS.get(f"{family}/{preset}", lm.DEFAULT_STEPS.get(preset, lm.FALLBACK_STEPS))
        extra = {}
        if family == "rnn_lm":   # training.train: character level, the byte tokenizer without merges
            from training.families import family_module

            extra["vocab_size"] = family_module("rnn_lm").Config.vocab_size
        return lm.LMTrainConfig(steps=steps, **extra)
    if family in ("gan", "vae", "diffusion"):
        from training import generative

        return generative.train_config(family, preset)
    raise ConfigError(f"no training recipe for family {family!r}")


def train_config_class(family: str) -> type:
    if family in ("mlp", "resnet", "rnn", "vae", "diffusion"):
        from training import loop

        return loop.TrainConfig
    if family in TOKEN_FAMILIES:
        from training import lm

        return lm.LMTrainConfig
    if family == "gan":
        from training.models import gan

        return gan.GANTrainConfig
    raise ConfigError(f"no training recipe for family {family!r}")


def resolve(family: str, preset: str | None = None, sets: typing.Sequence[str] = (),
            config_file: str | Path | None = None) -> RunConfig:
    """The run's configuration (module docstring); raises ConfigError."""
    from training.families import FAMILIES, family_module

    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    file_values = load_config_file(config_file) if config_file is not None else {}
    where = str(config_file)
    if "family" in file_values and file_values["family"] != family:
        raise ConfigError(f"config file {where} is for family {file_values['family']!r}, not {family!r}")
    if "preset" in file_values:
        if preset is not None and file_values["preset"] != preset:
            raise ConfigError(f"config file {where} is for preset {file_values['preset']!r}, "
                              f"but --preset is {preset!r}")
        preset = file_values["preset"]
    preset = DEFAULT_PRESET if preset is None else preset
    module = family_module(family)
    if preset not in module.PRESETS:
        raise ConfigError(f"unknown preset {preset!r} for {family}; known: {', '.join(module.PRESETS)}")

    classes = {"model": module.Config, "train": train_config_class(family)}
    types_ = {s: typing.get_type_hints(c) for s, c in classes.items()}
    fields = {s: [f.name for f in dataclasses.fields(c)] for s, c in classes.items()}
    derived = DERIVED.get(family, {})
    values = {"model": dict(module.PRESETS[preset]),
              "train": dataclasses.asdict(recipe_train_config(family, preset))}
    given: dict[str, tuple[Any, str]] = {}   # model field -> (value, where), for the derived check

    def put(section: str, key: str, raw: Any, origin: str, from_text: bool) -> None:
        if key not in fields[section]:
            raise ConfigError(_unknown(family, key, origin, {section: fields[section]}))
        value = _convert(raw, types_[section][key], f"{section}.{key}", origin, from_text)
        values[section][key] = value
        if section == "model":
            given[key] = (value, origin)

    for section in SECTIONS:
        for key, raw in (file_values.get(section) or {}).items():
            put(section, str(key), raw, f"config file {where}", from_text=False)
    for item in sets:
        section, key, raw = _split_set(item, family, fields, derived)
        put(section, key, raw, f"--set {item}", from_text=True)

    train = dataclasses.asdict(_build(classes["train"], values["train"], family, "train"))
    baseline = dataclasses.asdict(_build(module.Config, dict(module.PRESETS[preset]), family, "model"))
    for name, source in derived.items():
        final = baseline[name] if source == DATA_FIT else train[source]
        if name in given and given[name][0] != final:
            why = (DATA_FIT if source == DATA_FIT
                   else f"set by the {family} recipe from train.{source}; set train.{source} instead")
            raise ConfigError(f"{given[name][1]}: model.{name} is {why}")
        values["model"][name] = final
    model = dataclasses.asdict(_build(module.Config, values["model"], family, "model"))
    return RunConfig(family, preset, model, train)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a .yaml/.yml/.json file, its keys checked (FILE_KEYS)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: expected a .yaml, .yml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        if suffix == ".json":
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:   # yaml.YAMLError, json.JSONDecodeError: messages span lines
        raise ConfigError(f"config file {path}: not valid {suffix[1:].upper()}: {_one_line(exc)}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping with keys {', '.join(FILE_KEYS)}, "
                          f"got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in FILE_KEYS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown top-level key {unknown[0]!r}{_suggest(unknown[0], FILE_KEYS)}; "
                          f"allowed: {', '.join(FILE_KEYS)}")
    for key in SECTIONS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"config file {path}: {key!r} must be a mapping of field: value, "
                              f"got {type(data[key]).__name__}")
    for key in ("family", "preset"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"config file {path}: {key!r} must be a string, got {data[key]!r}")
    return data


def _split_set(item: str, family: str, fields: dict[str, list[str]],
               derived: dict[str, str]) -> tuple[str, str, str]:
    """`[section.]key=value` -> (section, key, raw value)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. n_layer=8 or train.lr=3e-4), got {item!r}")
    origin = f"--set {item}"
    if "." in key:
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"{origin}: unknown section {section!r}; use model.<field> or train.<field>")
        return section, name, raw
    in_model = key in fields["model"] and key not in derived
    in_train = key in fields["train"]
    if in_model and in_train:
        raise ConfigError(f"{origin}: {key!r} is both a model and a train field of {family}; "
                          f"write model.{key}= or train.{key}=")
    if in_train:
        return "train", key, raw
    if key in fields["model"]:
        return "model", key, raw
    raise ConfigError(_unknown(family, key, origin, fields))


def _unknown(family: str, key: str, origin: str, fields: dict[str, list[str]]) -> str:
    everything = [k for names in fields.values() for k in names]
    known = "; ".join(f"{section} keys: {', '.join(sorted(names))}" for section, names in fields.items())
    return f"{origin}: unknown key {key!r} for {family}{_suggest(key, everything)}; {known}"


def _suggest(key: str, names: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(raw: Any, annotation: Any, name: str, origin: str, from_text: bool) -> Any:
    """`raw` (a --set string, or a value read from a file) as `annotation`, or ConfigError."""
    value = raw
    optional = _allows_none(annotation)
    if from_text:
        text = raw.strip()
        if optional and text.lower() in ("none", "null"):
            return None
        if _is_sequence(annotation):
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = raw   # pydantic reports it against the type below
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
    expected = _type_name(annotation)
    if isinstance(value, bool) and _strip_none(annotation) in (int, float):   # YAML `yes` for an int
        raise ConfigError(f"{origin}: {name} expects {expected}, got {raw!r}")
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        raise ConfigError(f"{origin}: {name} expects {expected}, got {raw!r}") from None


def _build(cls: type, values: dict[str, Any], family: str, section: str):
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:   # the Config's own __post_init__ checks
        raise ConfigError(f"{family} {section} config: {_one_line(exc)}") from None


def _strip_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if _is_union(annotation) and len(args) == 1:
        return args[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _allows_none(annotation: Any) -> bool:
    return _is_union(annotation) and type(None) in typing.get_args(annotation)


def _is_sequence(annotation: Any) -> bool:
    return typing.get_origin(_strip_none(annotation)) in (tuple, list)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
