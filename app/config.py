"""Service settings, read once from the environment (prefix ``MEDINFER_``) and passed down.

Nothing here runs at import time: :func:`load_settings` is called by the CLI or by tests, and
the resulting frozen object travels through :class:`app.container.Container`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Values that ship in the source tree. Outside ``env="dev"``/``"test"`` the service refuses
#: to start while any secret still holds one of them.
MIN_SECRET_CHARS = 32
PLACEHOLDER_SECRET = "dev-only-change-me"  # noqa: S105 - a marker the validator refuses outside dev  # nosec B105

Environment = Literal["dev", "test", "production"]
LogFormat = Literal["json", "console"]


class Settings(BaseSettings):
    """Frozen service configuration.

    Every field can be set through ``MEDINFER_<FIELD>``; e.g. ``MEDINFER_DATABASE_URL``.
    """

    model_config = SettingsConfigDict(env_prefix="MEDINFER_", frozen=True, extra="ignore")

    env: Environment = "dev"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    keep_alive_s: float = Field(
        default=75.0,
        gt=0,
        le=3600,
        description="Idle HTTP keep-alive before the server closes a connection. Keep it above the "
        "idle timeout of the proxy in front (nginx and most load balancers: 60 s), so the proxy never "
        "reuses a connection the server is closing (a 502 to the client).",
    )

    data_dir: Path = Path("var")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Defaults to SQLite at <data_dir>/medinfer.db.",
    )
    database_timeout_s: float = Field(default=2.0, gt=0)
    model_repository: Path = Path("models")
    model_signing_public_key: Path | None = Field(
        default=None, description="PEM Ed25519 public key; when set, every model needs a valid model.onnx.sig."
    )
    model_poll_interval_s: float = Field(default=0.0, ge=0.0, description="Repository poll period; 0 turns it off.")
    keys_dir: Path | None = Field(default=None, description="Defaults to <data_dir>/keys.")

    tls_certfile: Path | None = Field(default=None, description="Serve HTTPS with this PEM certificate chain.")
    tls_keyfile: Path | None = Field(default=None, description="The certificate's private key (PEM).")
    tls_client_ca: Path | None = Field(
        default=None, description="Require client certificates issued by this CA bundle (mutual TLS)."
    )
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Cap on a request body as sent: for a JWE, the encrypted form (about 4/3 of the plaintext).",
    )
    max_tensor_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Cap per input tensor, checked before decoding."
    )
    default_deadline_ms: int = Field(default=30_000, ge=1, description="Deadline of a request that names none.")
    otel_enabled: bool = Field(default=False, description="OpenTelemetry server spans (needs the otel extra).")
    metrics_require_scope: bool = Field(default=False, description="Require scope metrics:read on /metrics.")
    overload_status: Literal[429, 503] = Field(default=429, description="Status of a request refused by a full queue.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: LogFormat = "json"

    key_encryption_key: SecretStr = Field(
        default=SecretStr(PLACEHOLDER_SECRET), description="Seals the JWE private keys at rest."
    )
    require_encryption: bool | None = Field(
        default=None, description="Accept only JWE payloads. Unset: on in production, off in dev and test."
    )
    auth_cache_s: float = Field(
        default=5.0, ge=0.0, description="How long an authenticated API key is trusted without a database read."
    )
    jwt_audience: str = Field(default="medinfer", description="The `aud` signed payloads and bearer JWTs must name.")
    oauth_jwks_file: Path | None = Field(
        default=None, description="The identity provider's JWKS (a file; nothing is fetched at run time)."
    )
    oauth_issuer: str | None = Field(default=None, description="Required `iss` of bearer JWTs.")
    key_max_age_days: int = Field(default=365, ge=1, description="Rotate the active key before it is this old.")
    key_retirement_days: int = Field(default=30, ge=1, description="How long a rotated-out key still opens payloads.")
    token_max_lifetime_s: int = Field(
        default=300,
        ge=1,
        le=3600,
        description="Longest exp - iat a signed payload may claim; a longer-lived token is refused.",
    )
    token_clock_skew_s: int = Field(
        default=60,
        ge=0,
        le=300,
        description="Clock difference tolerated on iat/exp. A jti is remembered until exp plus this, so no "
        "token is accepted twice while any clock would still take it.",
    )
    auth_failure_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="Anonymous authentication failures are audited as one event per reason per interval "
        "(with a count), not one row each.",
    )

    # HTTP limits (before and after authentication) ---------------------------------------
    http_max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, description="Cap on a request's start line and headers together."
    )
    http_header_timeout_s: float = Field(
        default=10.0, gt=0, description="A connection must deliver a request's complete headers within this long."
    )
    http_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait for the next piece of a request body, and the allowance on top of size / 64 KiB/s "
        "within which the whole body must arrive; a sender that misses either gets 408.",
    )
    http_max_concurrency: int = Field(
        default=512,
        ge=1,
        description="Requests in flight per process (idle kept-alive connections do not count); beyond it a "
        "request gets MEDINFER_OVERLOAD_STATUS with Retry-After.",
    )
    http_max_connections: int = Field(
        default=2048, ge=1, description="Open connections per process; beyond it new connections are closed at once."
    )
    http_max_requests_per_connection: int = Field(
        default=1000, ge=1, description="A keep-alive connection is closed after this many requests."
    )
    max_json_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Cap on a JSON (or FHIR JSON) request body, read only after the caller is authenticated.",
    )
    max_admin_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Cap on an administration request body (client registration)."
    )
    audit_enabled: bool = Field(
        default=True, description="Only for benchmark baselines; production refuses to run without the audit trail."
    )

    # Imaging (DICOM) ---------------------------------------------------------------------
    dicom_max_instance_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Cap on one DICOM instance's encoded bytes."
    )
    dicom_max_pixel_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024,
        description="Cap on the decoded pixel buffer a header declares (Rows x Columns x Frames x Bits x Samples).",
    )
    dicom_max_frames: int = Field(default=1024, ge=1, description="Cap on NumberOfFrames.")
    dicom_max_parts: int = Field(default=2000, ge=1, description="Cap on instances in one multipart body.")
    dicom_spool_dir: Path | None = Field(
        default=None,
        description="Where received instances wait for their study to settle. Defaults to <data_dir>/spool.",
    )
    dicom_spool_min_free_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, description="C-STORE answers out-of-resources below this much free disk."
    )
    imaging_routes: str | None = Field(
        default=None,
        description='JSON list of {"modality": [...], "body_part": [...], "model": name}; first match wins. '
        "Unset or []: no model is routed, and every C-STORE or STOW-RS instance is refused (no-route). A "
        "model's own allow-lists never route by themselves: the site enables each model here.",
    )
    acknowledged_nonclinical_models: list[str] = Field(
        default_factory=list,
        description='JSON list of "name@version". In production, a version whose model.toml says '
        "not_for_clinical_use = true is served only if named here; even then its results never go to a "
        "PACS. Ignored outside production.",
    )
    study_settle_s: float = Field(
        default=5.0, gt=0, description="A study is inferred once no instance of it arrived for this long."
    )
    study_drain_s: float = Field(
        default=15.0,
        ge=0,
        description="At shutdown, the studies still waiting are inferred at once, for up to this long; what is "
        "not done stays in the spool for the next start.",
    )
    dimse_enabled: bool = Field(default=False, description="Run the C-STORE/C-ECHO SCP in the service process.")
    dimse_host: str = "127.0.0.1"
    dimse_port: int = Field(default=11112, ge=0, le=65535, description="0 picks a free port (tests).")
    dimse_ae_title: str = Field(default="MEDINFER", min_length=1, max_length=16)
    dimse_allowed_calling_aes: list[str] = Field(
        default_factory=list, description="Calling AE titles allowed to associate; empty allows any."
    )
    dimse_max_associations: int = Field(default=8, ge=1)
    dimse_association_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="A connection must complete association set-up (A-ASSOCIATE-RQ) within this long.",
    )
    dimse_max_pdu_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=16 * 1024,
        description="Largest PDU read from a peer; a longer declared length aborts the association before "
        "anything is read. Association requests are capped at 64 KiB whatever this says.",
    )
    dimse_max_associations_per_peer: int = Field(
        default=2, ge=1, description="Associations one peer address may hold open at once."
    )
    decode_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Images decoded at once. Unset: as many as the container's memory limit (cgroup) allows at "
        "the pixel cap, at most the CPU count.",
    )
    pacs_destination: str | None = Field(
        default=None,
        description="Where DICOM SR results go: dimse://CALLED_AE@host:port or a DICOMweb base URL "
        "(http[s]://.../dicom-web) for STOW-RS. Unset: results stay in the database outbox only.",
    )
    pacs_retry_base_s: float = Field(default=1.0, gt=0, description="First retry delay; doubles up to 5 minutes.")
    pacs_max_attempts: int = Field(default=20, ge=1, description="Attempts before a result is marked failed.")

    audit_checkpoint_dir: Path | None = Field(
        default=None,
        description="Where signed audit head checkpoints are appended: a volume the database role cannot "
        "rewrite. Defaults to <data_dir>/audit-checkpoints.",
    )
    audit_checkpoint_key: Path | None = Field(
        default=None,
        description="PEM Ed25519 private key that signs checkpoints (outside the database). Unset: "
        "<keys_dir>/audit-checkpoint.pem, generated on first start outside production.",
    )
    audit_checkpoint_interval_s: float = Field(
        default=60.0, gt=0, description="How often the audit head is checkpointed (also at shutdown)."
    )
    database_service_role: str | None = Field(
        default=None,
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL: the role the service runs as. `medinfer migrate` (run as the table owner) "
        "grants it only what it needs: INSERT and SELECT on the audit trail, never ownership.",
    )
    audit_hmac_key: SecretStr = SecretStr(PLACEHOLDER_SECRET)
    pseudonym_key: SecretStr = SecretStr(PLACEHOLDER_SECRET)

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.env == "production" and not self.audit_enabled:
            msg = "production refuses MEDINFER_AUDIT_ENABLED=false"
            raise ValueError(msg)
        if self.env == "production":
            weak = [
                name
                for name in ("audit_hmac_key", "pseudonym_key", "key_encryption_key")
                if getattr(self, name).get_secret_value() in {PLACEHOLDER_SECRET, ""}
                or len(getattr(self, name).get_secret_value()) < MIN_SECRET_CHARS
            ]
            if weak:
                names = ", ".join(f"MEDINFER_{n.upper()}" for n in weak)
                msg = f"production refuses placeholder or short (<32 chars) secrets: {names}"
                raise ValueError(msg)
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The synchronous URL (Alembic, CLI)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'medinfer.db').resolve()}"

    @property
    def async_sqlalchemy_url(self) -> str:
        """The same database through an asyncio driver (aiosqlite, psycopg 3)."""
        url = self.sqlalchemy_url
        if url.startswith("sqlite:"):
            return "sqlite+aiosqlite:" + url.removeprefix("sqlite:")
        if url.startswith(("postgresql:", "postgres:")):
            return "postgresql+psycopg:" + url.split(":", 1)[1]
        return url

    @model_validator(mode="after")
    def _acknowledgements(self) -> Settings:
        for entry in self.acknowledged_nonclinical_models:
            name, at, number = entry.partition("@")
            if not (name and at and number.isdigit()):
                msg = 'MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS lists "name@version" entries (version a number)'
                raise ValueError(msg)
        return self

    @property
    def acknowledged(self) -> frozenset[str]:
        """The acknowledged ``name@version`` entries."""
        return frozenset(self.acknowledged_nonclinical_models)

    @model_validator(mode="after")
    def _pacs_destination(self) -> Settings:
        url = self.pacs_destination
        if url and not url.startswith(("dimse://", "http://", "https://")):
            msg = "MEDINFER_PACS_DESTINATION is dimse://CALLED_AE@host:port or a DICOMweb http(s):// base URL"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            msg = "MEDINFER_TLS_CERTFILE and MEDINFER_TLS_KEYFILE go together"
            raise ValueError(msg)
        if self.tls_client_ca is not None and self.tls_certfile is None:
            msg = "mutual TLS (MEDINFER_TLS_CLIENT_CA) needs MEDINFER_TLS_CERTFILE and MEDINFER_TLS_KEYFILE"
            raise ValueError(msg)
        return self

    @property
    def encryption_required(self) -> bool:
        return self.require_encryption if self.require_encryption is not None else self.env == "production"

    @property
    def resolved_keys_dir(self) -> Path:
        return self.keys_dir if self.keys_dir is not None else self.data_dir / "keys"

    @property
    def resolved_checkpoint_dir(self) -> Path:
        return (
            self.audit_checkpoint_dir if self.audit_checkpoint_dir is not None else self.data_dir / "audit-checkpoints"
        )

    @property
    def resolved_checkpoint_key(self) -> Path:
        return (
            self.audit_checkpoint_key
            if self.audit_checkpoint_key is not None
            else self.resolved_keys_dir / "audit-checkpoint.pem"
        )

    @property
    def resolved_spool_dir(self) -> Path:
        return self.dicom_spool_dir if self.dicom_spool_dir is not None else self.data_dir / "spool"


def service_version() -> str:
    """The installed distribution's version (also reported by ``GET /v2``)."""
    try:
        return version("medinfer")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment, with explicit overrides winning."""
    return Settings(**overrides)  # type: ignore[arg-type]
