"""Server settings: ZOOSERVE_* environment variables, overridden by `zooserve serve` flags."""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Literal, get_args, get_origin

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ZOOSERVE_"


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    registry: Path = Field(Path("registry"), description="registry root to serve")
    allow_empty: bool = Field(False, description="serve a registry folder that does not exist yet: it is created "
                              "empty, and models published into it later load through the registry watch")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(0, ge=0, le=65535, description="KServe v2 over gRPC (Triton's GRPCInferenceService) "
                           "on this port, beside HTTP, same host; 0 = no gRPC")
    # several event loops: one process parses, decodes and answers HTTP, and on 2 cores it is the
    # bound under load (bench/overload.py); each worker is a whole server on the same port
    workers: int = Field(1, ge=1, le=64, description="server processes on the one port (SO_REUSEPORT: the "
                         "kernel spreads connections), each with its own engines; /metrics sums them. "
                         "A stateful sequence lives in one worker: keep its requests on one connection")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU")
    # one intra-op thread per session: on small shared CPUs more threads are slower, not faster
    intra_op_threads: int = Field(1, ge=1)
    execution_instances: int | None = Field(None, ge=1, le=64, description="batches a classify model runs side by "
                                            "side (Triton's instance_group count) where its model.json does not "
                                            "say; default: one per usable core over intra-op threads")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(30.0, gt=0, description="default deadline of a queued request (504 after)")
    max_refusal_hold_s: float = Field(4.0, ge=0, description="a 429 for overload to a connection that comes back "
                                      "before its last Retry-After has passed is held until it has, at most this "
                                      "many seconds, pacing clients that retry at once (serve/api/pacing.py); "
                                      "0 turns it off")
    max_retry_after_s: int = Field(4, ge=1, description="a connection refused for overload again when it comes "
                                   "back about when its Retry-After said is told to wait twice as long, up to this "
                                   "many seconds (serve/api/pacing.py); 1 turns doubling off")
    allow_non_finite: bool = Field(False, description="accept NaN/Inf in float inputs")
    admin_token: str | None = Field(None, min_length=8, description="bearer token for repository load/unload; "
                                    "unset = off")
    drain_timeout_s: float = Field(30.0, ge=0, description="how long shutdown and unload wait for accepted work")
    # token engines: state slots (concurrent sequences) and the longest sequence a slot holds
    max_num_seqs: int = Field(64, ge=1, description="sequences a token engine runs at once; the rest wait")
    max_model_len: int | None = Field(None, ge=2, description="token slot length; default: the model's context")
    state_memory_mb: int = Field(2048, ge=1, description="memory a token engine may give its sequences' state "
                                 "(KV cache at full context, or recurrent state); with max_num_seqs it bounds "
                                 "how many sequences run at once")
    # sequence engines (rnn forecasters): history per request, stateful streams held between requests
    sequence_max_len: int = Field(4096, ge=1, description="time steps one request to a sequence model may carry")
    sequence_idle_timeout_s: float = Field(60.0, gt=0, description="a stateful sequence idle this long is freed "
                                           "(Triton's max_sequence_idle_microseconds, whose default is 1 s)")
    max_sequences: int = Field(10000, ge=1, description="live stateful sequences per model; a start beyond gets 429")
    # samplers (gan, vae, diffusion)
    max_samples_per_request: int = Field(64, ge=1, description="images one sampler request (or PNG grid) may ask "
                                         "for; more is a 400")
    denoise_max_rows: int = Field(256, ge=1, description="UNet rows one denoising step may carry (a guided sample "
                                  "is two rows); requests beyond wait for the next steps")
    # where state lives on a device (issue 18): token engines' KV slots / recurrent state, the denoise loop
    token_state: Literal["host", "device"] = Field("host", description="host: token state in numpy slots, the "
                                                   "step in the version's runtime; device: torch tensors on the "
                                                   "server's device with a torch step (what a TorchScript version "
                                                   "on CUDA gets anyway; on the CPU, ONNX Runtime is faster)")
    cuda_graphs: bool = Field(True, description="device-resident token engines on CUDA capture their decode "
                              "step once per batch bucket as a CUDA graph and replay it (serve/engines/"
                              "decode_graphs.py); false: every step launched eagerly")
    token_step: Literal["auto", "torchscript", "eager"] = Field("auto", description="the torch step of device "
                                                                "token state: auto = the package's TorchScript, "
                                                                "else the family's eager step")
    denoise_on_device: bool | None = Field(None, description="the denoise loop in torch on the runtime's device: "
                                           "unset = for a TorchScript version on CUDA; true = on the CPU too; "
                                           "false = never")
    denoise_noise: Literal["host", "device"] = Field("host", description="where the device loop draws noise: "
                                                     "host = each request's CPU generator (a seed gives the same "
                                                     "image on every device), device = on the GPU")
    watch_interval_s: float = Field(0.5, ge=0, description="how often the server polls its registry for new "
                                    "versions and model.json changes; 0 = never (reload through the admin API)")
    swap_grace_s: float = Field(0.5, ge=0, description="after a swap, how long a version that left the routing "
                                "still takes requests routed to it before the swap, before it drains and unloads")
    rollout_controller: bool = Field(True, description="run the rollout controller inside this server (judging "
                                     "on its own metrics); off for a fleet, where `zooserve rollout run` judges "
                                     "every replica's")
    rollout_period_s: float = Field(1.0, gt=0, description="how often the embedded controller looks at rollouts")
    shadow_max_in_flight: int = Field(32, ge=1, description="shadow copies one model runs at once; more are "
                                      "dropped (and counted), never a live request")
    # Triton's readiness by default: a load balancer must not send traffic to a replica that cannot
    # answer one of its models (a corrupt version, a failed golden check)
    readiness: Literal["strict", "lenient"] = Field("strict", description="strict: /v2/health/ready is 503 "
                                                    "while any model the server serves has no READY version; "
                                                    "lenient: 200 once the start-up load has finished, for "
                                                    "registries that hold models unloadable on purpose")
    # the HTTP front end of `zooserve serve`: our own thin ASGI layer, or LitServe's process layout
    # over the same app (serve/api/litserve_frontend.py)
    frontend: Literal["native", "litserve"] = Field("native", description="native: our ASGI layer (every "
                                                    "option, the fastest); litserve: the same app behind "
                                                    "LitServe's API server and inference worker")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = Field("auto", description="auto: text when stderr is a terminal, "
                                                         "else JSON lines")
    access_log: bool = Field(False, description="one log line per request: method, path, status, ms, request id")
    # batch jobs load only the models their lines name
    models: list[str] | None = Field(None, description="load only these models of the registry at start-up; "
                                     "unset = every model")


# settings whose values an error message must not repeat
_SECRET = {"admin_token"}
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "text", Path: "a path"}
_BOUNDS = (("ge", ">= {}"), ("gt", "> {}"), ("le", "<= {}"), ("lt", "< {}"),
           ("min_length", "of at least {} characters"))


def expected(name: str) -> str:
    """The values setting `name` takes, in words: 'an integer >= 0 and <= 65535', 'one of auto, cpu, cuda'."""
    field = ServeSettings.model_fields[name]
    kind = field.annotation
    if isinstance(kind, UnionType):                                     # X | None: unset is the default
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(get_args(kind))
    if get_origin(kind) is list:
        return 'a JSON list of names, e.g. ["mlp-digits"]'
    bounds = [text.format(getattr(m, attr)) for m in field.metadata for attr, text in _BOUNDS
              if getattr(m, attr, None) is not None]
    return " ".join([_KINDS.get(kind, "a value"), " and ".join(bounds)]).strip()


def explain(error: ValidationError, flags: dict[str, str]) -> list[str]:
    """One line per bad setting of a ServeSettings ValidationError, naming where its value came from:
    the command-line flag in `flags` (setting -> flag) when one gave it, else its ZOOSERVE_* variable."""
    lines: dict[str, str] = {}
    for problem in error.errors():
        name = str(problem["loc"][0])
        if name in lines or name not in ServeSettings.model_fields:
            continue
        value = "" if name in _SECRET else (f" {problem['input']}" if name in flags else f"={problem['input']!r}")
        source = flags.get(name) or f"{ENV_PREFIX}{name.upper()}"
        lines[name] = f"{source}{value} is not valid: expected {expected(name)}"
    return list(lines.values())
