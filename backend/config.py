"""`Settings`: every knob of the backend, read once from the environment and validated.

Names follow Label Studio's ML-backend conventions (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY,
BASIC_AUTH_USER/PASS, MODEL_DIR, port 9090). `.env.example` lists them all; the README's
configuration table is generated from the same field descriptions.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

DEFAULT_MODEL_NAME = "ViT-B-16-SigLIP"
"""Apache-2.0 weights, 76.0 % ImageNet zero-shot (open_clip results table)."""

DEFAULT_MODEL_PRETRAINED = "webli"

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class Settings(BaseSettings):
    """Backend configuration. Each field is read from the environment variable of the same name."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", env_file=None, protected_namespaces=()
    )

    # --- model -----------------------------------------------------------------------------
    MODEL_NAME: str = Field(
        DEFAULT_MODEL_NAME,
        description="open_clip architecture name (e.g. ViT-B-16-SigLIP, ViT-B-32-256), "
        "or 'hf-hub:org/repo' / 'local-dir:/path' (config, weights and tokenizer together).",
    )
    MODEL_PRETRAINED: str = Field(
        DEFAULT_MODEL_PRETRAINED,
        description="open_clip pretrained tag (e.g. webli, datacomp_s34b_b86k), or a path to a "
        "local checkpoint file, or 'none' for random weights (tests only).",
    )
    MODEL_CONFIG: Path | None = Field(
        None,
        description="Path to an open_clip model-config JSON for a custom architecture; "
        "MODEL_NAME then defaults to (and must equal) the file's stem.",
    )
    MODEL_CACHE_DIR: Path | None = Field(
        None, description="Where open_clip/Hugging Face downloads weights (default: HF cache)."
    )
    DEVICE: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    PRECISION: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on GPU, fp32 on CPU. bf16 on CPU: "
        "the weights in bf16, about 2x faster where the CPU has native BF16 (AVX512-BF16, AMX); "
        "embeddings differ from fp32 in the 4th decimal."
    )
    TEMPLATES: str = Field(
        "simple",
        description="Default prompt template set: simple (7, OpenAI's selection), openai (80), "
        "photo ('a photo of a {}.'), or templates separated by '|', each containing '{}'.",
    )
    TOP_K: int = Field(5, ge=1, le=50, description="Alternatives kept with each prediction.")
    BATCH_SIZE: int = Field(0, ge=0, description="Encoder batch cap; 0 = auto (8 CPU, 64 GPU).")
    BATCH_WAIT_MS: float = Field(
        5.0, ge=0,
        description="How long the encoder waits to fill a batch from concurrent requests.",
    )
    DECODE_THREADS: int = Field(
        0, ge=0, description="Image decode threads when DECODE_PROCESSES=0; 0 = CPU count."
    )
    DECODE_PROCESSES: int | None = Field(
        None, ge=0,
        description="Processes that fetch, hash, decode and resize images (the data plane), "
        "handing uint8 pixels to the model through shared memory; unset = one per CPU; 0 = "
        "none: fetch on the event loop and decode in DECODE_THREADS threads (also used when "
        "the model's preprocessing cannot be split).",
    )
    MAX_PROMPTS_PER_CONFIG: int = Field(
        100_000, gt=0,
        description="Most prompts one label config may expand to (labels x predicted_values x "
        "templates, plus model_prompts); /setup and /predict refuse a larger one with 422. "
        "10,000 labels x the 80 'openai' templates would be 800,000.",
    )

    # --- images ----------------------------------------------------------------------------
    FETCH_CONCURRENCY: int = Field(
        16, ge=1, le=256,
        description="Image downloads in flight: in the server, and in each decode process "
        "(DECODE_PROCESSES), which holds that many images' pixels in shared memory (/dev/shm): "
        "processes x FETCH_CONCURRENCY x side x side x 3 bytes, 6.75 MiB per process at 384 px. "
        "Fewer if /dev/shm is too small for that (a warning names the fix; Docker: --shm-size).",
    )
    FETCH_TIMEOUT_S: float = Field(
        20.0, gt=0, description="Total time allowed to download one image, in seconds."
    )
    CONNECT_TIMEOUT_S: float = Field(5.0, gt=0, description="TCP/TLS connect timeout, seconds.")
    MAX_IMAGE_BYTES: int = Field(
        50 * 1024 * 1024, gt=0, description="Largest image download accepted, in bytes."
    )
    MAX_IMAGE_PIXELS: int = Field(
        100_000_000, gt=0, description="Largest image accepted (width x height) before decoding."
    )
    MAX_DECODE_BYTES: int = Field(
        256 * 1024 * 1024, gt=0,
        description="Most memory one decoded image may take, in bytes (width x height x bytes "
        "per pixel as Pillow holds it: 1 for 8-bit gray and palette, 2 for 16-bit gray, 4 for "
        "RGB, RGBA and float), checked before decoding; JPEGs count at the reduced size they "
        "are decoded at. Up to DECODE_THREADS images decode at once.",
    )
    IMAGE_FORMATS: str = Field(
        "JPEG,PNG,WEBP,GIF,BMP,TIFF",
        description="Image formats (Pillow names, comma-separated) that are decoded; any other "
        "is refused per task. JPEG includes multi-picture phone photos (MPO).",
    )
    IMAGE_URL_ALLOWLIST: str = Field(
        "",
        description="Hosts, IPs or CIDR ranges (comma-separated) task image URLs may reach even "
        "though they are loopback or private, e.g. 'minio.internal,10.20.0.0/16'. Public "
        "addresses and the Label Studio host are always allowed.",
    )
    LOCAL_FILES_DOCUMENT_ROOT: Path | None = Field(
        None,
        description="Same as Label Studio's: '/data/local-files/?d=' paths are read from here "
        "when present on this machine, else fetched from Label Studio.",
    )
    IMAGE_REF_TTL_S: float = Field(
        7 * 24 * 3600.0, ge=0,
        description="How long, in seconds, an image URL is trusted to still hold the image "
        "downloaded from it: within this time a task whose image is already embedded is "
        "re-scored (e.g. after a label change) without downloading it again. The cost: an image "
        "replaced behind the same URL is only seen once this time has passed since its last "
        "download. 0 = download and hash every image on every /predict.",
    )

    # --- Label Studio ----------------------------------------------------------------------
    LABEL_STUDIO_URL: str | None = Field(
        None,
        description="Label Studio base URL as this backend reaches it (uploads, presigned cloud "
        "URLs). Falls back, per project, to the hostname Label Studio sends in /setup.",
    )
    LABEL_STUDIO_API_KEY: str | None = Field(
        None,
        description="Label Studio token: a legacy token or a personal access token (JWT), sent "
        "to LABEL_STUDIO_URL only (setting it without LABEL_STUDIO_URL is an error). Without it, "
        "the token Label Studio sends in /setup is used, for that /setup's host only.",
    )
    LABEL_STUDIO_TIMEOUT_S: float = Field(
        30.0, gt=0, description="Timeout of each call to Label Studio's API (pre-label jobs "
        "read task pages and import predictions), seconds.",
    )

    # --- store -----------------------------------------------------------------------------
    REDIS_URL: str | None = Field(
        None, description="redis://host:port/db; without it an embedded store in MODEL_DIR is used."
    )
    MODEL_DIR: Path = Field(
        Path(".model-dir"),
        description="Directory for local state: the embedded store (no REDIS_URL) and the "
        "spool that keeps corrections while Redis is unreachable.",
    )
    STORE_PREFIX: str = Field(
        "clip-backend", min_length=1, description="Prefix of every Redis key this backend writes."
    )
    REDIS_TIMEOUT_S: float = Field(
        0.5, gt=0,
        description="Redis connect/read timeout in seconds; past it, corrections are spooled.",
    )

    # --- whole-project pre-label jobs --------------------------------------------------------
    PRELABEL_EXECUTOR: Literal["local", "rq"] = Field(
        "local", description="Who works a pre-label job started over HTTP: local (this "
        "process, sharing its model) or rq (RQ workers, `python -m backend worker`, on any "
        "machine that reaches REDIS_URL).",
    )
    PRELABEL_ITEM_TASKS: int = Field(
        64, ge=1, le=1000, description="Tasks per work item: predicted together and written to "
        "Label Studio in one import call.",
    )
    PRELABEL_PAGE_SIZE: int = Field(
        100, ge=1, le=1000, description="Tasks read per Label Studio API page while planning.",
    )
    PRELABEL_PARALLEL: int = Field(
        2, ge=1, le=64, description="Work items in flight per process (downloads of one overlap "
        "the encoding of another).",
    )

    # --- learning from corrections ---------------------------------------------------------
    ADAPT: bool = Field(
        True, description="Fit adapted, calibrated heads from corrections (on Label Studio's "
        "Train button and every ADAPT_EVERY corrections). false = zero-shot only.",
    )
    SYNC_MODEL_VERSION: bool = Field(
        True, description="After predicting, set the Label Studio project's model_version to the "
        "version emitted (needs LABEL_STUDIO_API_KEY), so the Data Manager's prediction score "
        "column is filled and sortable. false = leave the project alone.",
    )
    ADAPT_EVERY: int = Field(
        20, ge=0, description="Refit a project's head after this many new corrections; 0 = only "
        "when Label Studio sends START_TRAINING.",
    )

    # --- server ----------------------------------------------------------------------------
    HOST: str = Field(
        "0.0.0.0", description="Interface the server listens on (0.0.0.0: all of them). Without "
        "BASIC_AUTH_USER/BASIC_AUTH_PASS on a non-loopback address, `serve` and `doctor` warn "
        "that anyone who reaches the port may call every route; 127.0.0.1 when Label Studio "
        "runs on the same machine.",
    )
    PORT: int = Field(9090, ge=1, le=65535, description="Port the server listens on.")
    WORKERS: int = Field(1, ge=1, description="Server processes; each loads its own model.")
    THREADS: int = Field(
        0, ge=0,
        description="PyTorch CPU threads per server process (torch.set_num_threads); 0 = "
        "PyTorch's default (one per core). With WORKERS > 1 on CPU, keep WORKERS x THREADS "
        "at most the number of cores.",
    )
    BASIC_AUTH_USER: str | None = Field(None, description="Require HTTP Basic auth (user).")
    BASIC_AUTH_PASS: str | None = Field(None, description="Require HTTP Basic auth (password).")
    WEBHOOK_SECRET: str | None = Field(
        None,
        description="Shared secret Label Studio's webhook sends in the X-Webhook-Secret header; "
        "when set, /webhook requires it (or Basic auth).",
    )
    MAX_REQUEST_BYTES: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest request body accepted, in bytes (413)."
    )
    REQUEST_BODY_TIMEOUT_S: float = Field(
        60.0, gt=0,
        description="Time a client has to send a whole request body once its headers are in, "
        "in seconds; a slower one gets 408 and its connection is closed.",
    )
    MAX_CORRECTION_BYTES: int = Field(
        4 * 1024 * 1024, gt=0,
        description="Largest annotation event kept in the corrections log, in bytes (its JSON); "
        "a webhook carrying a larger one gets 413 and nothing of it is recorded.",
    )
    MAX_TASKS_PER_REQUEST: int = Field(
        10_000, gt=0, description="Most tasks one /predict may carry (413 beyond)."
    )
    MAX_PENDING_TASKS: int = Field(
        20_000, gt=0,
        description="Tasks in progress across concurrent /predict calls before new ones get a "
        "quick 503 (overload protection).",
    )
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level: DEBUG, INFO, WARNING or ERROR."
    )
    LOG_FORMAT: Literal["text", "json"] = Field(
        "text",
        description="text (one readable line per event) or json (one JSON object per line, for "
        "log collectors); both carry the request id (X-Request-ID).",
    )

    @field_validator("DEVICE")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("LOG_FORMAT", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("LABEL_STUDIO_URL")
    @classmethod
    def _check_ls_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. http://label-studio:8080")
        return value.rstrip("/")

    @field_validator("IMAGE_URL_ALLOWLIST")
    @classmethod
    def _check_allowlist(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            if "/" in item:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not a CIDR range like 10.0.0.0/8") from None
            elif "://" in item or " " in item:
                raise ValueError(f"{item!r}: list hosts, IPs or CIDR ranges, not URLs")
        return value

    @field_validator("IMAGE_FORMATS")
    @classmethod
    def _check_formats(cls, value: str) -> str:
        Image.init()
        names = [part.strip().upper() for part in value.split(",") if part.strip()]
        unknown = [name for name in names if name not in Image.OPEN]
        if not names or unknown:
            raise ValueError(f"unknown image format(s) {', '.join(unknown) or value!r}; "
                             f"choose from {', '.join(sorted(Image.OPEN))}")
        return ",".join(names)

    @field_validator("REDIS_URL")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WEBHOOK_SECRET")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if bool(self.BASIC_AUTH_USER) != bool(self.BASIC_AUTH_PASS):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.LABEL_STUDIO_API_KEY and not self.LABEL_STUDIO_URL:
            raise ValueError(
                "LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the key is only ever "
                "sent to LABEL_STUDIO_URL, never to a host a /setup request names. Set "
                "LABEL_STUDIO_URL to Label Studio's address as this backend reaches it, or "
                "unset LABEL_STUDIO_API_KEY to use the host and token Label Studio sends in /setup"
            )
        if self.MODEL_CONFIG is not None:
            self._check_model_config()
        if _looks_like_path(self.MODEL_PRETRAINED) and not Path(self.MODEL_PRETRAINED).is_file():
            raise ValueError(
                f"MODEL_PRETRAINED={self.MODEL_PRETRAINED!r} looks like a path but no such file "
                "exists; point it at a checkpoint file or use an open_clip pretrained tag"
            )
        return self

    def _check_model_config(self) -> None:
        assert self.MODEL_CONFIG is not None
        if not self.MODEL_CONFIG.is_file():
            raise ValueError(f"MODEL_CONFIG={self.MODEL_CONFIG} does not exist")
        stem = self.MODEL_CONFIG.stem
        if "MODEL_NAME" not in self.model_fields_set:
            self.MODEL_NAME = stem
        elif self.MODEL_NAME != stem:
            raise ValueError(
                f"MODEL_NAME={self.MODEL_NAME!r} must equal the MODEL_CONFIG file stem {stem!r} "
                "(open_clip registers a config under its file name); unset MODEL_NAME or rename"
            )

    @property
    def auth_enabled(self) -> bool:
        return self.BASIC_AUTH_USER is not None

    @property
    def image_formats(self) -> tuple[str, ...]:
        """IMAGE_FORMATS as Pillow format names."""
        return tuple(self.IMAGE_FORMATS.split(","))


_SECRET_FIELDS = frozenset({"LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "WEBHOOK_SECRET"})


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (plus overrides); raise ConfigError naming the fix."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = ".".join(str(part) for part in err["loc"]) or "settings"
        given = err.get("input")
        secret = name in _SECRET_FIELDS
        shown = "" if secret or isinstance(given, dict) or given is None else f"={given!r}"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{name}{shown}: {message}")
    return "Invalid configuration; fix these environment variables:\n  " + "\n  ".join(lines)
