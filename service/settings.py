"""Service settings: one ``Settings`` object, from ``KGDX_*`` environment variables and CLI flags.

Validators refuse unsafe values (no authentication on a non-loopback address, limits out of
range) with a message naming the setting.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything ``kgdx serve`` can be told; environment variables are ``KGDX_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="KGDX_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"  # bind address
    port: int = Field(8000, ge=1, le=65535)
    checkpoint: Path | None = None  # checkpoint folder; None = the bundled default model
    ontology: str | None = None  # file or NAME[@VERSION]; None = the checkpoint's own version
    allow_other_ontology: bool = False  # serve a checkpoint against another ontology version
    device: Literal["auto", "cpu", "cuda"] = "auto"
    db_url: str | None = None  # SQLAlchemy URL; None = SQLite under $KGDX_HOME
    no_auth: bool = False  # only allowed on a loopback host
    max_batch_size: int = Field(16, ge=1, le=512)  # images per forward pass
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0)  # how long a batch waits to fill
    max_queue: int = Field(256, ge=1, le=100_000)  # waiting requests before 503
    request_timeout_s: float = Field(60.0, gt=0, le=3600)  # per-request inference deadline
    decode_threads: int = Field(4, ge=1, le=64)  # image decoding off the event loop
    torch_threads: int | None = Field(None, ge=1, le=256)  # intra-op threads; None = torch's
    max_stow_bytes: int = Field(4 * 2**30, ge=1024)  # one STOW-RS body -> 413 beyond
    max_stow_parts: int = Field(10_000, ge=1)  # instances in one STOW-RS body
    # write and fsync each /v1/predict result before answering, and each audit row; else a
    # result is committed by a writer thread right after its answer (readable at once; a
    # crash in that millisecond or a power cut may lose the stored copy: service/results.py).
    # STOW-RS acknowledgements and jobs are always flushed.
    durable_results: bool = False
    max_upload_bytes: int = Field(50 * 2**20, ge=1024)  # larger uploads -> 413
    # a deflated DICOM data set may inflate to this much (STOW-RS; /v1/predict allows
    # max_upload_bytes); checked as it inflates, before the DICOM reader sees it
    max_inflated_bytes: int = Field(512 * 2**20, ge=1024)
    max_pixels: int = Field(60_000_000, ge=1024)  # width x height limit, checked before decoding
    min_image_side: int = Field(16, ge=1)  # smaller images -> 422
    threshold: float | None = Field(None, ge=0.0, le=1.0)  # default decision threshold
    top_k_paths: int = Field(3, ge=0, le=20)  # explanation paths per finding
    evidence_k: int = Field(5, ge=1, le=50)  # evidence concepts per finding
    # how evidence concepts are ranked: "attention" (the fusion attention: no backward pass;
    # the deletion test finds it little better than random concepts) or "attribution" (the
    # logit each concept's removal would cost, to first order: the faithful ranking, ratio
    # 10.8 against 1.2 on the bundled model, but its batched backward pass through fusion and
    # decoder takes the model from about 5 to 12 ms an image on a 2-core CPU and halves the
    # service's throughput there); models/attribution.py, MODEL_CARD.md
    evidence: Literal["attribution", "attention"] = "attention"
    max_path_hops: int = Field(4, ge=1, le=6)
    rate_limit_per_minute: int | None = Field(None, ge=1)  # per API key; None = no limit
    cors_origins: list[str] = Field(default_factory=list)  # closed by default
    log_level: str = "INFO"
    log_json: bool = True
    drain_timeout_s: float = Field(30.0, ge=0)  # graceful shutdown budget
    # Idle keep-alive connections are closed after this long. Longer than clients' own idle
    # limits (httpx 5 s, curl and proxies 60 s), so a client never sends on a connection
    # the server is closing at that moment (the request would be reset, not answered).
    keep_alive_s: float = Field(75.0, ge=1.0, le=3600.0)
    # -- study jobs: DICOMweb ingest -> selection -> inference -> SR -> push (service.jobs)
    stable_seconds: float = Field(5.0, ge=0.0, le=86400.0)  # study quiet this long -> a job
    worker_poll_s: float = Field(1.0, gt=0.0, le=60.0)  # how often the study worker looks
    job_max_attempts: int = Field(5, ge=1, le=100)  # processing tries before a job fails
    job_backoff_s: float = Field(2.0, ge=0.0, le=3600.0)  # first retry delay, doubled per try
    job_backoff_max_s: float = Field(300.0, ge=0.0, le=86400.0)  # longest retry delay
    job_lease_s: float = Field(60.0, ge=0.5, le=3600.0)  # a silent worker's job is taken back
    sr_destination_url: str | None = None  # DICOMweb root the SR is pushed to (STOW-RS)
    sr_destination_user: str | None = None  # basic authentication at the destination
    sr_destination_password: SecretStr | None = None
    sr_destination_token: SecretStr | None = None  # bearer token instead of user/password
    sr_push_max_attempts: int = Field(50, ge=1, le=10_000)  # SR pushes before a job fails
    sr_push_timeout_s: float = Field(30.0, gt=0.0, le=600.0)  # one STOW-RS request

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {value!r}")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard_cors(cls, value: list[str]) -> list[str]:
        if "*" in value:
            raise ValueError("cors_origins may not contain '*': list the origins you trust")
        return value

    @field_validator("sr_destination_url")
    @classmethod
    def _destination_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "sr_destination_url must be an http(s) DICOMweb root such as "
                f"http://pacs:8042/dicom-web, got scheme {parts.scheme or 'none'!r}"
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(
                "sr_destination_url must not carry credentials, a query or a fragment; use "
                "sr_destination_user / sr_destination_password or sr_destination_token"
            )
        return value

    @model_validator(mode="after")
    def _one_destination_auth(self) -> Settings:
        if self.sr_destination_token is not None and (
            self.sr_destination_user is not None or self.sr_destination_password is not None
        ):
            raise ValueError(
                "give sr_destination_user / sr_destination_password or sr_destination_token, "
                "not both"
            )
        if self.sr_destination_password is not None and self.sr_destination_user is None:
            raise ValueError("sr_destination_password needs sr_destination_user")
        return self

    @model_validator(mode="after")
    def _auth_only_off_on_loopback(self) -> Settings:
        if self.no_auth and not is_loopback(self.host):
            raise ValueError(
                f"no_auth is only allowed on a loopback host (127.0.0.1, ::1, localhost), "
                f"not {self.host!r}"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings from the environment."""
    return Settings()
