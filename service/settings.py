"""The service's one configuration: environment variables `FOLDSERVE_*` and `foldserve serve`.

Built once at start-up (`load_settings`) and passed down (`create_app(settings)`), so tests make
apps with their own settings instead of patching globals. A bad value fails at start-up with one
line naming the variable, never later in a request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.errors import SettingsError

ENV_PREFIX = "FOLDSERVE_"
MiB = 1 << 20


def _split_commas(value: Any) -> Any:
    """`a,b` from the environment or the command line; lists pass through."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


CommaList = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    """Every knob of the service. Field names are the CLI option names with `-` for `_`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    repository: Path = Field(Path("models"), description="model repository folder")
    models: CommaList = Field(
        (),
        description="models to load at start-up and require for readiness, comma-separated "
        "(default: every model in the repository)",
    )
    providers: CommaList = Field(
        ("auto",),
        description="ONNX Runtime execution providers in order of preference, comma-separated: "
        "'auto' (CUDA when ONNX Runtime offers it, else CPU), or names such as "
        "'CUDAExecutionProvider,CPUExecutionProvider' ('cuda' and 'cpu' are accepted)",
    )
    device_id: int = Field(0, ge=0, description="GPU device id for CUDA/TensorRT providers")
    # CUDA and TensorRT provider options (docs/gpu.md); without those providers they are unused.
    cuda_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        "HEURISTIC",
        description="cuDNN convolution algorithm choice: HEURISTIC (cuDNN's guess, quick "
        "first calls), EXHAUSTIVE (ONNX Runtime's own default: benchmarks every algorithm for "
        "each new input shape, so the first call at every batch size is slow, sometimes for "
        "faster kernels), DEFAULT (no search)",
    )
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kNextPowerOfTwo",
        description="how the CUDA memory arena grows: kNextPowerOfTwo (fewer, larger "
        "allocations) or kSameAsRequested (no overshoot, for tight GPU memory)",
    )
    cuda_mem_limit_mib: int = Field(
        0, ge=0, description="limit of each session's CUDA memory arena in MiB (0: no limit)"
    )
    cuda_tf32: bool = Field(
        True,
        description="let CUDA run float32 convolutions and matrix products in TF32 on GPUs "
        "that have it (faster; about 1e-3 relative error); off for full float32 precision",
    )
    cuda_graphs: bool = Field(
        False,
        description="capture a CUDA graph for each model whose inputs and outputs all have "
        "fixed shapes, and replay it (less launch overhead for small models; calls to one such "
        "model then run one at a time); other models run as usual",
    )
    tensorrt_fp16: bool = Field(
        False, description="let the TensorRT provider (when named in providers) build fp16 engines"
    )
    tensorrt_cache_dir: Path | None = Field(
        None,
        description="folder where the TensorRT provider keeps built engines, so a restart "
        "does not rebuild them (default: no cache)",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads within an operator (0: ONNX Runtime's choice)"
    )
    inter_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads across operators (0: ONNX Runtime's choice)"
    )
    max_body_bytes: int = Field(
        64 * MiB, gt=0, description="largest request body accepted; larger ones get 413"
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="longest a request body may take to arrive, from the first read; a slower "
        "one gets 408 and its connection is closed (a trickling client holds no queue place, "
        "worker or shutdown for longer)",
    )
    max_decompressed_bytes: int = Field(
        64 * MiB,
        gt=0,
        description="largest body once inflated, for a request sent with Content-Encoding "
        "gzip or deflate; inflation stops there and the request gets 413",
    )
    # Each limit below is checked on what a request declares (a shape, an image header) before
    # anything of that size is allocated; the body limit bounds what is actually sent.
    max_tensor_elements: int = Field(
        1 << 26,
        gt=0,
        description="most elements one input tensor of an infer request may declare; a larger "
        "shape gets 400 before its data is converted",
    )
    max_request_batch_size: int = Field(
        8192,
        gt=0,
        description="most rows (first dimension) one infer or classify request may carry, for "
        "a model with a batch dimension; more get 400",
    )
    max_image_pixels: int = Field(
        40_000_000,
        gt=0,
        description="largest image classify decodes, in pixels (width x height), read from "
        "its header before a pixel is decoded (decompression bombs); larger ones get 400",
    )
    api_token: SecretStr | None = Field(
        None,
        description="if set, infer, classify, repository control and stats require "
        "'Authorization: Bearer <token>'",
    )
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    workers: int = Field(
        1,
        ge=1,
        description="server processes sharing the port; /metrics adds up all of them "
        "(repository load/unload reaches only the process that answers it)",
    )
    shutdown_grace_s: float = Field(
        5.0,
        ge=0,
        description="seconds after SIGTERM during which the server still accepts connections, "
        "answers readiness with 'not ready' and new inference with 503, so load balancers "
        "take it out; in-flight requests then finish before it exits 0",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="after the grace period, longest the requests in flight may take to "
        "finish; those still running are then cancelled and the process exits",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level of the service and uvicorn"
    )
    access_log: bool = Field(True, description="one structured log line per request")
    request_id_header: str = Field(
        "X-Request-ID",
        min_length=1,
        description="header carrying the request id: taken from the request when present, "
        "generated otherwise, and echoed in the response and the access log",
    )
    warmup_runs: int = Field(3, ge=1, description="inference runs at load before a version serves")
    inline_max_us: float = Field(
        200.0,
        ge=0,
        description="run inference on the event loop, not a worker thread, when the warm-up "
        "measured a call at most this long (the thread handoff costs more than a tiny model)",
    )
    # The dynamic batcher's knobs (service/batching.py); a model's config.json may override
    # max_batch_size and max_queue_delay_us, or turn batching off ("dynamic_batching": false).
    max_batch_size: int = Field(
        64,
        ge=0,
        description="largest batch the dynamic batcher forms, in rows (0 or 1: no batching); "
        "a larger request runs on its own",
    )
    max_queue_delay_us: int = Field(
        500,
        ge=0,
        description="longest a batch waits for companions, and only while more requests are "
        "being received: a lone request never waits",
    )
    max_queue_size: int = Field(
        1024,
        ge=1,
        description="requests waiting per model version (being received or queued; for a "
        "model that does not batch, in flight) before new ones get 503 with Retry-After, "
        "refused before their body is read",
    )

    _split = field_validator("models", "providers", mode="before")(_split_commas)

    @field_validator("repository")
    @classmethod
    def _repository_is_a_folder(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{value} is not a folder")
        return value

    @field_validator("tensorrt_cache_dir")
    @classmethod
    def _cache_is_a_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a folder")
        return value

    @field_validator("providers")
    @classmethod
    def _some_provider(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one provider, or 'auto'")
        return value

    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Environment, then `overrides` (CLI options, None meaning 'not given') on top.

    Raises `SettingsError` with one line naming the first bad variable.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(p) for p in error["loc"]) or "settings"
    env = ENV_PREFIX + field.split(".")[0].upper()
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid setting {field} ({env}): {error['msg']}{more}"


class CliOption(BaseModel):
    """One `foldserve serve` option, derived from a Settings field so the two never drift."""

    flag: str
    field: str
    help: str
    default: Any


def cli_options() -> list[CliOption]:
    """The options `foldserve serve` should offer: `--<field-with-dashes>`, help from the field."""
    options = []
    for name, info in Settings.model_fields.items():
        default = info.default
        if isinstance(default, tuple):
            default = ",".join(default)
        options.append(
            CliOption(
                flag="--" + name.replace("_", "-"),
                field=name,
                help=info.description or name,
                default=default,
            )
        )
    return options
