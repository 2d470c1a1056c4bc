"""The registry's JSON documents as pydantic models.

`manifest.json` describes one immutable version; `model.json` holds the model-level serving
settings (batching, routing, version policy) that may change while a server runs. Both are
plain JSON so that anyone can read a registry with the standard library alone; these models
only validate and give names to the fields.
"""

from __future__ import annotations

from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from .routing import Rollout, Routing

# KServe v2 datatypes the registry accepts in a signature.
DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
)

Kind = Literal["classify", "sequence", "tokens", "sample", "denoise"]
Format = Literal["onnx", "torchscript"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """One named tensor of a signature, as KServe v2 metadata shows it."""

    name: str
    datatype: Literal[DATATYPES]  # type: ignore[valid-type]
    # -1 marks a variable dimension; the first dimension is the batch when the model batches
    shape: list[int]


class Signature(_Strict):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ParityReport(_Strict):
    """Export checked against eager at publish time (and again by the server at load)."""

    format: Format
    # largest absolute difference between the artifact and eager over every checked shape
    max_abs_error: float
    # the bound the check used; passed = max_abs_error <= tolerance
    tolerance: float
    passed: bool
    # input shapes that were run (the exporter can freeze a dimension marked dynamic)
    shapes_checked: list[list[int]] = Field(default_factory=list)


class Lineage(_Strict):
    """Where a version came from: enough to retrain it, or for an imported model (trained
    elsewhere, `zooserve registry import`) the file it was imported from."""

    training_config: dict[str, Any] = Field(default_factory=dict)
    dataset: str = ""
    dataset_split: str = ""
    dataset_sha256: str = ""
    # a user's own data (`zooserve train --data`, training/user_data.py): source, format, rows per
    # split, class names and counts, what dataset_sha256 covers; None for bundled datasets
    dataset_details: dict[str, Any] | None = None
    seed: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    code_revision: str | None = None
    created_at: str = ""
    # imported models only (None for models trained here): the source file's absolute path and
    # sha256, and the import's options (format, example input shape, batch, golden seed)
    imported_from: str | None = None
    imported_sha256: str | None = None
    import_options: dict[str, Any] | None = None


class StateSpec(_Strict):
    """What a stateful artifact (sequence kind) takes beyond its signature; the server fills these
    and keeps the state between a sequence's requests, clients never send or see them."""

    # per-row lengths of a right-padded batch (INT64 [-1])
    lengths: TensorSpec
    # initial-state inputs, in the artifact's argument order after the signature's and `lengths`
    inputs: list[TensorSpec]
    # final-state outputs after the signature's, one per `inputs` entry, in the same order
    outputs: list[TensorSpec]


class PartSpec(_Strict):
    """One exported function of a model served in parts (the generative kinds: the GAN generator,
    the VAE decoder and encoder, the diffusion denoiser). The server composes the parts into the
    public `signature` (a sampler's label + seed -> image); each part is exported, checked against
    eager and golden-checked on its own. Its golden pair is stored in the version's golden file as
    `part.<part>.input.<name>` / `part.<part>.output.<name>`."""

    # format -> file name (generator.onnx, generator.ts, ...)
    artifacts: dict[str, str]
    # the artifact's own inputs and outputs, in argument order
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # this part's export against eager, one report per format
    parity: list[ParityReport] = Field(default_factory=list)


class SplitPrefillSpec(_Strict):
    """A recurrent token model's prefill in ONNX segments with a native kernel between them
    (training/split_prefill.py): a server that can load the kernel runs prompts through these and
    decode steps through the main artifact; one that cannot runs the main artifact for both."""

    # segment files, in order (prefill_0.onnx .. prefill_<layers>.onnx)
    segments: list[str]
    # the native op run between segments (training/kernels/<kernel>.c)
    kernel: str
    # prefill through the segments and decode through the main artifact, against eager
    parity: ParityReport


class Generation(_Strict):
    """How a generative version samples: what the exporters write (training/export.py; the
    families' `generation_defaults`) and the server reads. Every key is optional: each kind writes
    its own, and a key left out is not written back (old manifests keep their bytes).

    Read by attribute, or by key as the plain dict it used to be (`generation.get("steps", 50)`,
    `"n_classes" in generation`): a key is there when the manifest gives it."""

    # token models: the longest prompt + completion the exported artifact takes
    max_model_len: int | None = None
    # samplers (GAN, VAE, diffusion): the range of the images they produce, and how that maps to digits' 0..16
    output_range: list[float] | None = None
    digits_scale: str | None = None
    # class-conditional samplers (GAN, diffusion): labels 0..n_classes-1
    n_classes: int | None = None
    # GAN and VAE: the latent they draw from
    latent_dim: int | None = None
    latent_distribution: str | None = None
    # diffusion: the sampler's defaults and the trained noise schedule
    sampler: Literal["ddim", "ddpm"] | None = None
    steps: int | None = None
    eta: float | None = None
    guidance: float | None = None
    clip_sample: bool | None = None
    clipped_eps: bool | None = None
    timestep_spacing: str | None = None
    num_train_timesteps: int | None = None
    beta_schedule: str | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    null_label: int | None = None       # the "no label" class of classifier-free guidance
    sample_shape: list[int] | None = None

    @model_serializer(mode="wrap")
    def _given_keys_only(self, write) -> dict[str, Any]:
        return {key: value for key, value in write(self).items() if value is not None}

    def _given(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}

    def get(self, key: str, default: Any = None) -> Any:
        return self._given().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self._given()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._given()

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # the keys, as a dict's
        return iter(self._given())


class Manifest(_Strict):
    """manifest.json of one version. `name`, `version` and `files` are written by publish."""

    name: str | None = None
    version: int | None = None
    family: str
    kind: Kind
    # which artifact the server runs
    format: Format
    # every artifact present, format -> file name (model.onnx, model.ts); for a model in `parts`,
    # the main part's (the generator, the VAE decoder, the denoiser)
    artifacts: dict[str, str]
    # relative path -> sha256 hex of every file in the version except manifest.json
    files: dict[str, str] = Field(default_factory=dict)
    # the public KServe v2 signature (what clients send and get back)
    signature: Signature
    # class labels, index -> label, for classifiers
    labels: list[str] = Field(default_factory=list)
    # sampling defaults of token and generative kinds (empty for the others)
    generation: Generation = Field(default_factory=Generation)
    # file name of the tokenizer for token kinds
    tokenizer: str | None = None
    # golden inputs and outputs (safetensors: "input.<name>", "output.<name>"), replayed at load
    golden: str | None = "golden.safetensors"
    lineage: Lineage = Field(default_factory=Lineage)
    # export against eager per format; for a model in `parts`, its public function end to end (a
    # seeded request through the exported parts against the eager sampler)
    parity: list[ParityReport] = Field(default_factory=list)
    # sequence kind: the artifact's server-side inputs and outputs (lengths, hidden state)
    state: StateSpec | None = None
    # models served as several artifacts (sample and denoise kinds): part name -> its artifacts,
    # tensors and parity; None for a model that is one artifact
    parts: dict[str, PartSpec] | None = None
    # recurrent token models whose prompts can run split around a native kernel; None otherwise
    prefill: SplitPrefillSpec | None = None


class Batching(_Strict):
    max_batch_size: int = Field(32, ge=1)
    max_queue_delay_ms: float = Field(0.5, ge=0)
    # requests waiting beyond this are refused with 429
    max_queue_size: int = Field(1024, ge=1)
    # a request whose expected wait (requests ahead / the measured drain rate) is longer is refused
    # with 429 before its body is read: the queue is bounded by time, not only by count
    max_queue_wait_ms: float = Field(1000.0, gt=0)


class InstanceGroup(_Strict):
    """How a classify model's batches execute (Triton's instance_group): `count` execution
    instances run batches side by side, each on its own thread over the version's one runtime
    (ONNX Runtime and TorchScript take concurrent runs), with `intra_op_threads` threads inside each
    run. None: chosen for the machine (serve/instances.py). Changing it reloads the version."""

    count: int | None = Field(None, ge=1, le=64)
    # ONNX Runtime versions only: torch keeps one thread pool per process (the server's --threads)
    intra_op_threads: int | None = Field(None, ge=1, le=64)


class VersionPolicy(_Strict):
    """Which versions a server loads (Triton's version_policy); aliased versions always load."""

    policy: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = Field(1, ge=1)       # for "latest"
    versions: list[int] = Field(default_factory=list)  # for "specific"


class ModelConfig(_Strict):
    """model.json: model-level settings, replaced atomically while servers watch it."""

    name: str
    family: str
    kind: Kind
    batching: Batching = Field(default_factory=Batching)
    instance_group: InstanceGroup = Field(default_factory=InstanceGroup)
    routing: Routing = Field(default_factory=Routing)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    # the progressive rollout in force or last run (None: never started)
    rollout: Rollout | None = None
    # raised by one on every write: a writer that read an older revision is refused (409)
    revision: int = Field(0, ge=0)
