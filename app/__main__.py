"""The ``medinfer`` command line: serve, migrate, keys, clients, models, audit, outbox, encrypt, openapi."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings, load_settings
from app.domain import Scope
from app.errors import MedinferError

if TYPE_CHECKING:
    from app.security.keystore import KeyStore


def _exit_cleanly(_signum: int, _frame: object) -> None:
    sys.exit(0)


def _cmd_serve(settings: Settings, _args: argparse.Namespace) -> int:
    from app.main import create_app  # noqa: PLC0415 - only this command needs the server
    from app.observability.logging import configure_logging  # noqa: PLC0415
    from app.transport.http.server import serve  # noqa: PLC0415

    configure_logging(settings.log_level, settings.log_format)
    # uvicorn drains on SIGTERM/SIGINT, runs the lifespan shutdown (batchers drain, the audit
    # writer commits), restores the previous handlers and re-raises the signal. These handlers
    # turn that re-raise into exit status 0: a graceful stop is a success for Kubernetes.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _exit_cleanly)
    serve(settings, create_app)
    return 0


def _alembic_config(settings: Settings) -> object:
    from alembic.config import Config  # noqa: PLC0415

    import migrations  # noqa: PLC0415 - shipped beside `app` in the same distribution

    root = Path(migrations.__file__).resolve().parent
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root))
    config.attributes["settings"] = settings
    return config


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from alembic import command  # noqa: PLC0415

    config = _alembic_config(settings)
    if args.downgrade:
        command.downgrade(config, args.revision or "-1")  # type: ignore[arg-type]
    else:
        command.upgrade(config, args.revision or "head")  # type: ignore[arg-type]
    return 0


def _keystore(settings: Settings) -> KeyStore:
    from app.security.keystore import KeyStore  # noqa: PLC0415

    return KeyStore(settings.resolved_keys_dir, settings.key_encryption_key.get_secret_value()).load()


def _cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import timedelta  # noqa: PLC0415

    if args.keys_command == "dev-init":
        return _dev_init(settings)
    store = _keystore(settings)
    if args.keys_command == "generate":
        stored = store.generate(state=args.state, alg=args.alg)
        print(json.dumps({"kid": stored.kid, "state": stored.state, "alg": stored.alg}))
    elif args.keys_command == "rotate":
        stored = store.rotate(timedelta(days=settings.key_retirement_days))
        print(json.dumps({"active": stored.kid, "retention_days": settings.key_retirement_days}))
    else:
        for stored in store.keys:
            retire = stored.retire_until.isoformat() if stored.retire_until else None
            print(json.dumps({"kid": stored.kid, "state": stored.state, "alg": stored.alg, "retire_until": retire}))
    return 0


def register_api_client(
    settings: Settings,
    client_id: str,
    scopes: Sequence[Scope],
    *,
    encryption_jwk: dict[str, Any] | None = None,
    signing_jwk: dict[str, Any] | None = None,
    replace: bool = False,
) -> str:
    """Register a client (``encryption_jwk`` / ``signing_jwk`` optional) and return its API key.

    With ``replace``, the client's keys in use are revoked first, in the same transaction (a
    client id holds one unrevoked key)."""
    from sqlalchemy.orm import Session  # noqa: PLC0415

    from app.db import create_sync_engine  # noqa: PLC0415
    from app.errors import ClientNotFoundError  # noqa: PLC0415
    from app.security.clients import register_client, revoke_client  # noqa: PLC0415

    engine = create_sync_engine(settings)
    try:
        with Session(engine) as db, db.begin():
            if replace:
                with contextlib.suppress(ClientNotFoundError):
                    revoke_client(db, client_id)
            return register_client(
                db, client_id, scopes, encryption_jwk=encryption_jwk, signing_jwk=signing_jwk
            ).api_key
    finally:
        engine.dispose()


def _key_registered(settings: Settings, api_key: str) -> bool:
    from sqlalchemy.orm import Session  # noqa: PLC0415

    from app.db import create_sync_engine  # noqa: PLC0415
    from app.security.keys import API_KEY_PREFIX  # noqa: PLC0415
    from app.tables import ApiClient  # noqa: PLC0415

    key_id = api_key.removeprefix(API_KEY_PREFIX).partition(".")[0]
    engine = create_sync_engine(settings)
    try:
        with Session(engine) as db:
            return db.get(ApiClient, key_id) is not None
    finally:
        engine.dispose()


def _dev_init(settings: Settings) -> int:
    """Create a dev API client with every scope and a JWE key, once. Dev mode only."""
    if settings.env != "dev":
        print("keys dev-init runs only with MEDINFER_ENV=dev", file=sys.stderr)
        return 2
    creds = settings.data_dir / "dev-credentials.json"
    store = _keystore(settings)
    if not any(k.state == "active" for k in store.keys):
        store.generate("active")
    if creds.exists() and _key_registered(settings, json.loads(creds.read_text(encoding="utf-8"))["api_key"]):
        print(f"dev credentials already in {creds}")
        return 0
    # The credentials file was lost (or names a key no longer registered): a new key replaces it.
    key = register_api_client(settings, "dev", list(Scope), replace=True)
    creds.parent.mkdir(parents=True, exist_ok=True)
    creds.unlink(missing_ok=True)
    creds.write_text(json.dumps({"client_id": "dev", "api_key": key}, indent=2), encoding="utf-8")
    creds.chmod(0o600)
    print(f"dev credentials written to {creds}")
    return 0


def _cmd_clients(settings: Settings, args: argparse.Namespace) -> int:
    """``register`` (prints the key once), ``list`` and ``revoke``; each is audited with actor ``cli``."""
    import asyncio  # noqa: PLC0415

    from sqlalchemy.orm import Session  # noqa: PLC0415

    from app.audit.cli import cli_audit_writer  # noqa: PLC0415
    from app.db import create_sync_engine  # noqa: PLC0415
    from app.domain import AuditRecord  # noqa: PLC0415
    from app.security import clients  # noqa: PLC0415

    def audit(action: str, **detail: object) -> None:
        async def record() -> None:
            async with cli_audit_writer(settings) as writer:
                await writer.record(AuditRecord(action=action, outcome="success", actor="cli", detail=detail))

        asyncio.run(record())

    def show(info: clients.ClientKeyInfo) -> None:
        print(json.dumps({
            "client_id": info.client_id, "key_id": info.key_id, "scopes": list(info.scopes),
            "created_at": info.created_at.isoformat(),
            "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
            "seals_results": info.seals_results, "signs_payloads": info.signs_payloads,
        }))  # fmt: skip

    engine = create_sync_engine(settings)
    try:
        if args.clients_command == "list":
            with clients.client_store(), Session(engine) as db:
                listed = clients.list_clients(db)
            audit("client.list", keys=len(listed))
            for info in listed:
                show(info)
        elif args.clients_command == "revoke":
            with clients.client_store(), Session(engine) as db, db.begin():
                revoked = clients.revoke_client(db, args.client_id, key_id=args.key_id)
            audit("client.revoke", client_id=args.client_id, key_ids=[k.key_id for k in revoked])
            for info in revoked:
                show(info)
        else:
            keys = {
                name: json.loads(Path(path).read_text(encoding="utf-8")) if path else None
                for name, path in (("encryption_jwk", args.encryption_jwk), ("signing_jwk", args.signing_jwk))
            }
            scopes = sorted(clients.parse_scopes(args.scope), key=lambda s: s.value)
            with clients.client_store(), Session(engine) as db, db.begin():
                new = clients.register_client(db, args.client_id, scopes, **keys)
            try:
                audit("client.register", client_id=args.client_id, key_id=new.key_id, scopes=[s.value for s in scopes])
            except MedinferError:
                # No audit event, no key: it is never printed, and the id must not stay taken.
                try:
                    with clients.client_store(), Session(engine) as db, db.begin():
                        clients.undo_registration(db, new.key_id)
                except MedinferError:
                    # Report why the registration failed, not the undo; say which key to revoke.
                    print(f"registration not undone: revoke key {new.key_id}", file=sys.stderr)
                raise
            print(json.dumps({"client_id": args.client_id, "api_key": new.api_key}))
    finally:
        engine.dispose()
    return 0


def _client_id(value: str) -> str:
    """argparse type: the same rule as the HTTP schema, so a bad id is a usage error, not a 500."""
    from app.security.clients import check_client_id  # noqa: PLC0415

    try:
        return check_client_id(value)
    except MedinferError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def _stored_client_id(value: str) -> str:
    """argparse type for naming an existing client: any id a registration may have stored (also
    before ids were restricted, such as "HIS Epic"), matched exactly."""
    from app.security.clients import check_stored_client_id  # noqa: PLC0415

    try:
        return check_stored_client_id(value)
    except MedinferError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def _cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from app.container import clinical_use_policy  # noqa: PLC0415
    from app.inference.registry import load_version  # noqa: PLC0415
    from app.inference.spec import iter_model_dirs, load_spec  # noqa: PLC0415

    if args.models_command == "sign":
        from app.inference.release import sign_release  # noqa: PLC0415

        print(f"wrote {sign_release(Path(args.private_key), Path(args.file))}")
        return 0
    from app.security.keys import load_ed25519_public_key  # noqa: PLC0415

    trusted = load_ed25519_public_key(settings.model_signing_public_key) if settings.model_signing_public_key else None
    policy = clinical_use_policy(settings)
    repository = Path(args.repository) if args.repository else settings.model_repository
    failures = 0
    dirs = list(iter_model_dirs(repository))
    if not dirs:
        print(f"{repository}: no models found")
    for model_dir in dirs:
        try:
            spec = load_spec(model_dir)
        except MedinferError as exc:
            failures += 1
            print(f"FAIL {model_dir.name}: {exc.detail}")
            continue
        for version in spec.served_versions():
            if policy.refuses(spec, version):
                # The production gate: checked before anything is loaded, as the service does.
                failures += 1
                print(
                    f"REFUSED {spec.name} v{version}: [model-not-acknowledged] not_for_clinical_use and not named "
                    f"in MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS ({spec.name}@{version}); production will not serve it"
                )
                continue
            try:
                served = load_version(spec, model_dir, version, trusted)
            except MedinferError as exc:
                failures += 1
                print(f"FAIL {spec.name} v{version}: [{exc.code}] {exc.detail}")
            else:
                withheld = "; results never sent to a PACS" if policy.withholds_results(spec) else ""
                print(
                    f"ok   {spec.name} v{version} sha256={served.sha256} providers={','.join(served.loaded.providers)}"
                    f"{withheld}"
                )
    return 1 if failures else 0


def _cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from app.audit.cli import run_audit_command  # noqa: PLC0415

    return run_audit_command(settings, args.audit_command, output=getattr(args, "output", None))


def _cmd_outbox(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415
    from datetime import UTC, datetime  # noqa: PLC0415

    from app.audit.cli import cli_audit_writer  # noqa: PLC0415
    from app.db import create_async_db  # noqa: PLC0415
    from app.domain import AuditRecord  # noqa: PLC0415
    from app.imaging.outbox import count_backlog, requeue  # noqa: PLC0415

    async def run() -> int:
        engine, sessionmaker = create_async_db(settings)
        try:
            if args.outbox_command == "requeue":
                async with cli_audit_writer(settings) as writer:
                    count = await requeue(sessionmaker, args.state, datetime.now(UTC))
                    await writer.record(
                        AuditRecord(
                            action="pacs.outbox.requeue",
                            outcome="success",
                            actor="cli",
                            detail={"states": sorted(args.state), "count": count},
                        )
                    )
                print(json.dumps({"requeued": count}))
                return 0
            backlog = await count_backlog(sessionmaker)
            oldest = backlog.oldest_waiting
            age = None if oldest is None else round((datetime.now(UTC) - oldest).total_seconds(), 1)
            print(json.dumps({**backlog.by_state, "oldest_waiting_age_s": age}))
            return 0
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _cmd_encrypt(_settings: Settings, args: argparse.Namespace) -> int:
    from app.client import encrypt, load_jwks  # noqa: PLC0415

    sys.stdout.write(encrypt(Path(args.file).read_bytes(), args.cty, load_jwks(args.jwks)) + "\n")
    return 0


def _cmd_openapi(settings: Settings, args: argparse.Namespace) -> int:
    from app.main import create_app  # noqa: PLC0415

    text = json.dumps(create_app(settings).openapi(), indent=2, sort_keys=True) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medinfer", description="Hospital AI inference service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP service (settings from MEDINFER_* variables)")
    migrate = sub.add_parser("migrate", help="apply database migrations (a separate step, never at start-up)")
    migrate.add_argument("--revision", default=None)
    migrate.add_argument("--downgrade", action="store_true")
    keys = sub.add_parser("keys", help="manage JWE keys and dev credentials")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="create a key pair (sealed at rest with the KEK)")
    generate.add_argument("--state", choices=["active", "next"], default="next")
    generate.add_argument("--alg", choices=["ECDH-ES+A256KW", "RSA-OAEP-256"], default="ECDH-ES+A256KW")
    keys_sub.add_parser("rotate", help="promote the next key (or a new one); the old one opens payloads a while")
    keys_sub.add_parser("list", help="list keys (no private material)")
    keys_sub.add_parser("dev-init", help="create dev credentials and a key if absent (dev only)")
    clients = sub.add_parser("clients", help="manage API clients")
    clients_sub = clients.add_subparsers(dest="clients_command", required=True)
    register = clients_sub.add_parser(
        "register", help="register a client and print its API key once (refused if the id holds an unrevoked key)"
    )
    register.add_argument("--client-id", required=True, type=_client_id)
    register.add_argument("--scope", action="append", required=True, choices=[s.value for s in Scope])
    register.add_argument("--encryption-jwk", help="public JWK file: results are sealed to it on request")
    register.add_argument("--signing-jwk", help="public JWK file: payloads must then be signed, then encrypted")
    clients_sub.add_parser("list", help="list every key, revoked ones too (never a key, hash or salt)")
    revoke = clients_sub.add_parser(
        "revoke",
        help="revoke a client's keys (running services refuse them within MEDINFER_AUTH_CACHE_S); the id is "
        "then free for a new registration",
    )
    revoke.add_argument(
        "--client-id", required=True, type=_stored_client_id, help="exactly as listed (any stored id, quoted)"
    )
    revoke.add_argument("--key-id", default=None, help="revoke only this key of the client (see `clients list`)")
    models = sub.add_parser("models", help="inspect the model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    validate = models_sub.add_parser(
        "validate",
        help="check specs, checksums, release signatures, loadability and (with MEDINFER_ENV=production) the "
        "not-for-clinical-use gate, offline; exit 1 if any version would not serve",
    )
    validate.add_argument("--repository", default=None)
    sign = models_sub.add_parser(
        "sign",
        help="write <version>/release.sig: a detached Ed25519 signature over the version's release manifest "
        "(the ONNX sha256 and model.toml's result-affecting declarations); release step",
    )
    sign.add_argument(
        "--private-key", required=True, help="PEM Ed25519 private key (openssl genpkey -algorithm ed25519)"
    )
    sign.add_argument("file", help="models/NAME/VERSION/model.onnx (must match the sha256 pinned in model.toml)")
    audit = sub.add_parser("audit", help="verify or export the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="walk the hash chain; exit 1 and name the first broken link if any")
    export = audit_sub.add_parser("export", help="write FHIR AuditEvent NDJSON")
    export.add_argument("--output", required=True)
    outbox = sub.add_parser("outbox", help="the PACS outbox: DICOM SR results not yet delivered")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    outbox_sub.add_parser("status", help="undelivered results by state and the oldest one's age (no identifiers)")
    requeue = outbox_sub.add_parser(
        "requeue", help="send held (no destination was set) or failed (gave up) results again; audited"
    )
    requeue.add_argument("--state", action="append", required=True, choices=["held", "failed"])
    encrypt = sub.add_parser("encrypt", help="seal a payload as compact JWE to a JWKS (for integration engineers)")
    encrypt.add_argument("--jwks", required=True, help="file or URL, e.g. https://host/.well-known/jwks.json")
    encrypt.add_argument("--cty", required=True, help="media type inside, e.g. application/dicom")
    encrypt.add_argument("file")
    openapi = sub.add_parser("openapi", help="print or write the OpenAPI document")
    openapi.add_argument("--output", default=None)
    return parser


_COMMANDS = {
    "serve": _cmd_serve,
    "migrate": _cmd_migrate,
    "keys": _cmd_keys,
    "clients": _cmd_clients,
    "models": _cmd_models,
    "audit": _cmd_audit,
    "outbox": _cmd_outbox,
    "encrypt": _cmd_encrypt,
    "openapi": _cmd_openapi,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ValueError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command](settings, args)
    except MedinferError as exc:
        print(f"error [{exc.code}]: {exc.detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
