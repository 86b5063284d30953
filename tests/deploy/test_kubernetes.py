"""Static checks of deploy/kubernetes: render the overlays offline, validate, scan, assert.

- The overlays are rendered by ``tests/deploy/kustomize.py`` (a renderer of exactly the
  kustomize subset we use); where a ``kubectl`` is on PATH its ``kubectl kustomize`` output must
  be the same, object for object.
- Built-in kinds are validated with kubernetes-validate (its JSON schemas ship in the wheel) in
  strict mode, against the oldest and the newest Kubernetes we target. It has no schemas for
  custom resources, so the CloudNativePG Cluster, ServiceMonitor and PrometheusRule are checked
  against the hand-written structural schemas below (the fields we use, nothing else allowed).
- checkov's kubernetes framework scans the rendered manifests offline: no failed check, and
  every skip is an annotation listed in ``ALLOWED_CHECKOV_SKIPS`` with its reason.

No cluster, no network.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from app.config import Settings
from app.container import clinical_use_policy
from app.imaging.routing import parse_routes
from app.inference.spec import iter_model_dirs, load_spec
from app.transport.dimse.node import pacs_sender
from tests.deploy import kustomize
from tests.deploy.support import (
    ADAPTER_VALUES,
    BASE,
    OPERATIONS,
    OVERLAYS,
    REPO,
    SECRET_TEMPLATES,
    app_metric_families,
    load_yaml,
    load_yaml_documents,
)
from tests.support.checkov import run_checkov

OVERLAY_NAMES = ("cpu", "gpu")
#: The oldest and newest Kubernetes minor the manifests are validated against.
KUBERNETES_VERSIONS = ("1.30", "1.37")
CUSTOM_KINDS = frozenset({"Cluster", "ServiceMonitor", "PrometheusRule"})
EXPECTED_OBJECTS = {
    ("Namespace", "medinfer"),
    ("ServiceAccount", "medinfer"),
    ("Cluster", "medinfer-db"),
    ("NetworkPolicy", "medinfer-db"),
    ("Job", "medinfer-migrate"),
    ("ConfigMap", "medinfer-site"),
    ("StatefulSet", "medinfer"),
    ("Service", "medinfer"),
    ("Service", "medinfer-dicom"),
    ("Service", "medinfer-headless"),
    ("PodDisruptionBudget", "medinfer"),
    ("HorizontalPodAutoscaler", "medinfer"),
    ("NetworkPolicy", "medinfer"),
    ("ServiceMonitor", "medinfer"),
    ("PrometheusRule", "medinfer"),
}
NAMESPACE = "medinfer"
RUNTIME_UID = 10001
HTTP_PORT = 8000
DICOM_PORT = 11112
#: Where the PACS's pods listen, for the outbox's SR deliveries: DICOM (104, Orthanc's 4242, 11112)
#: and DICOMweb (443, Orthanc's 8042).
PACS_PORTS = frozenset({104, 4242, 11112, 443, 8042})
#: The per-site settings, kept out of the StatefulSet in this ConfigMap.
SITE_CONFIG = "medinfer-site"
SITE_SETTINGS = frozenset(
    {
        "MEDINFER_DIMSE_ALLOWED_CALLING_AES",
        "MEDINFER_PACS_DESTINATION",
        "MEDINFER_IMAGING_ROUTES",
        "MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS",
    }
)
HPA_METRIC = "medinfer_inference_queue_depth"
#: Apply order (docs/operations.md): each stage only needs what earlier stages (or the operator's
#: Secrets, created between `prerequisites` and `database`) provide.
STAGES = ("prerequisites", "database", "migration", "service")
#: Checkov checks the manifests may skip, each with the reason it is safe. Every
#: ``checkov.io/skip*`` annotation in the rendered manifests must be listed here, and vice versa.
ALLOWED_CHECKOV_SKIPS: dict[str, str] = {
    "CKV_K8S_43": "image by digest: the digest exists only after the release build; pinned then in the overlay",
    "CKV_K8S_35": "secrets as env: the service reads MEDINFER_* settings (and libpq PGPASSWORD) from the environment",
}
PROBE_PATHS = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
#: The server: a StatefulSet, so that each pod keeps its DICOM spool on its own volume.
SERVER = ("StatefulSet", "medinfer")
#: Where the server's data volume (a claim per pod) is mounted: MEDINFER_DATA_DIR.
DATA_DIR = "/var/lib/medinfer"
CHECKPOINT_DIR = "/var/lib/medinfer-audit"


# ---------------------------------------------------------------------------------------------
# Rendering


Object = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Object]]:
    return {name: kustomize.render(OVERLAYS / name) for name in OVERLAY_NAMES}


def find(objects: list[Object], kind: str, name: str) -> Object:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container(obj: Object) -> Object:
    containers = kustomize.pod_specs(obj)[0]["containers"]
    assert len(containers) == 1, f"{obj['kind']}/{obj['metadata']['name']}: one container expected"
    return containers[0]


def env_of(obj: Object) -> dict[str, Object]:
    return {e["name"]: e for e in container(obj)["env"]}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(obj: Object) -> dict[str, str]:
    return dict(obj["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_overlay_renders_the_expected_objects(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    assert set(keys) == EXPECTED_OBJECTS
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by the operator, never applied"


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n", encoding="utf-8")
    with pytest.raises(kustomize.UnsupportedKustomizationError, match="commonLabels"):
        kustomize.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\npatches:\n  - path: p.yaml\n    target: {kind: Deployment}\n", encoding="utf-8"
    )
    with pytest.raises(kustomize.UnsupportedKustomizationError, match="only `patches: - path: FILE`"):
        kustomize.render(tmp_path)


def test_strategic_merge_subset() -> None:
    original = {
        "containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]}, {"name": "b"}],
        "tolerations": [{"key": "k"}],
        "keep": 1,
        "drop": 2,
    }
    patch = {
        "containers": [{"name": "a", "env": [{"name": "B", "value": "2"}]}, {"name": "c"}],
        "tolerations": [{"key": "gpu"}],
        "drop": None,
    }
    assert kustomize.strategic_merge(original, patch) == {
        "containers": [
            {"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "b"},
            {"name": "c"},
        ],
        "tolerations": [{"key": "gpu"}],
        "keep": 1,
    }


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_renderer_matches_kubectl_kustomize(rendered: dict[str, list[Object]], overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH: the offline renderer is not cross-checked on this machine")
    done = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    theirs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    def key(obj: Object) -> tuple[str, str, str | None, str]:
        return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]

    mine = {key(o): o for o in rendered[overlay]}
    assert mine == {key(o): o for o in theirs}


# ---------------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_validate_strictly(rendered: dict[str, list[Object]], overlay: str, version: str) -> None:
    errors: list[str] = []
    for obj in rendered[overlay]:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if obj["kind"] not in CUSTOM_KINDS:
                errors.append(f"{name}: no schema for {obj['apiVersion']} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
    assert not errors, "\n".join(errors)


def test_strict_validation_catches_a_misspelt_field(rendered: dict[str, list[Object]]) -> None:
    server = copy.deepcopy(find(rendered["cpu"], *SERVER))
    container(server)["readinesProbe"] = container(server).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(server, KUBERNETES_VERSIONS[0], strict=True)


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A closed JSON Schema object: only the listed properties, the required ones present."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STRING = {"type": "string"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"type": ["string", "integer"]}
_METADATA = _object(
    {"name": _STRING, "namespace": _STRING, "labels": _STRING_MAP, "annotations": _STRING_MAP}, ("name", "namespace")
)
_QUANTITIES = {"type": "object", "additionalProperties": _QUANTITY}
_RESOURCES = _object({"requests": _QUANTITIES, "limits": _QUANTITIES})
_RULE = _object(
    {
        "alert": _STRING,
        "record": _STRING,
        "expr": _STRING,
        "for": _STRING,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    ("expr",),
)
#: The fields of the custom resources we use, from the CRDs of CloudNativePG 1.25+
#: (postgresql.cnpg.io/v1) and the Prometheus Operator (monitoring.coreos.com/v1).
CUSTOM_RESOURCE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Cluster": _object(
        {
            "apiVersion": {"const": "postgresql.cnpg.io/v1"},
            "kind": {"const": "Cluster"},
            "metadata": _METADATA,
            "spec": _object(
                {
                    "instances": {"type": "integer", "minimum": 1},
                    "imageName": _STRING,
                    "primaryUpdateStrategy": {"enum": ["unsupervised", "supervised"]},
                    "enableSuperuserAccess": {"type": "boolean"},
                    "postgresql": _object(
                        {
                            "parameters": _STRING_MAP,
                            "synchronous": _object(
                                {"method": {"enum": ["any", "first"]}, "number": {"type": "integer", "minimum": 1}},
                                ("method", "number"),
                            ),
                        }
                    ),
                    "bootstrap": _object(
                        {
                            "initdb": _object(
                                {
                                    "database": _STRING,
                                    "owner": _STRING,
                                    "dataChecksums": {"type": "boolean"},
                                    "encoding": _STRING,
                                },
                                ("database", "owner"),
                            )
                        },
                        ("initdb",),
                    ),
                    "storage": _object({"size": _STRING, "storageClass": _STRING}, ("size",)),
                    "walStorage": _object({"size": _STRING, "storageClass": _STRING}, ("size",)),
                    "affinity": _object(
                        {
                            "enablePodAntiAffinity": {"type": "boolean"},
                            "topologyKey": _STRING,
                            "podAntiAffinityType": {"enum": ["preferred", "required"]},
                        }
                    ),
                    "resources": _RESOURCES,
                    "managed": _object(
                        {
                            "roles": {
                                "type": "array",
                                "items": _object(
                                    {
                                        "name": _STRING,
                                        "ensure": {"enum": ["present", "absent"]},
                                        "login": {"type": "boolean"},
                                        "superuser": {"type": "boolean"},
                                        "createdb": {"type": "boolean"},
                                        "createrole": {"type": "boolean"},
                                        "inherit": {"type": "boolean"},
                                        "replication": {"type": "boolean"},
                                        "passwordSecret": _object({"name": _STRING}, ("name",)),
                                    },
                                    ("name",),
                                ),
                            }
                        }
                    ),
                },
                ("instances", "storage", "bootstrap"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    "ServiceMonitor": _object(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": _object(
                {
                    "jobLabel": _STRING,
                    "selector": _object({"matchLabels": _STRING_MAP}, ("matchLabels",)),
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": _object(
                            {
                                "port": _STRING,
                                "path": _STRING,
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                                "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            },
                            ("port",),
                        ),
                    },
                },
                ("selector", "endpoints"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    "PrometheusRule": _object(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": _object(
                {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": _object(
                            {
                                "name": _STRING,
                                "interval": _STRING,
                                "rules": {"type": "array", "minItems": 1, "items": _RULE},
                            },
                            ("name", "rules"),
                        ),
                    }
                },
                ("groups",),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
}


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_custom_resources_are_structurally_valid(rendered: dict[str, list[Object]], overlay: str) -> None:
    custom = [o for o in rendered[overlay] if o["kind"] in CUSTOM_KINDS]
    assert {o["kind"] for o in custom} == CUSTOM_KINDS
    for obj in custom:
        jsonschema.validate(obj, CUSTOM_RESOURCE_SCHEMAS[obj["kind"]])


# ---------------------------------------------------------------------------------------------
# checkov


@pytest.fixture(scope="module")
def checkov_reports(rendered: dict[str, list[Object]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkov run over both rendered overlays (a file each); results keyed by overlay."""
    folder = tmp_path_factory.mktemp("rendered")
    args = ["--framework", "kubernetes"]
    for name, objects in rendered.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False), encoding="utf-8")
        args += ["-f", str(path)]
    reports = run_checkov(*args)
    assert len(reports) == 1, [r.get("check_type") for r in reports]
    report = reports[0]
    by_overlay: dict[str, Any] = {name: {"passed": [], "failed": [], "skipped": []} for name in rendered}
    for outcome in ("passed", "failed", "skipped"):
        for check in report["results"].get(f"{outcome}_checks", []):
            by_overlay[Path(check["file_abs_path"]).stem][outcome].append(check)
    return {"summary": report["summary"], **by_overlay}


def _skip_annotations(objects: list[Object]) -> list[tuple[str, str, str]]:
    found = []
    for obj in objects:
        for key, value in (obj["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                assert value.count("=") == 1, f"{key}: checkov splits on '=', write the reason without one"
                check_id, reason = value.split("=")
                found.append((obj["metadata"]["name"], check_id.strip(), reason.strip()))
    return found


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_checkov_kubernetes(checkov_reports: dict[str, Any], rendered: dict[str, list[Object]], overlay: str) -> None:
    assert checkov_reports["summary"]["parsing_errors"] == 0
    results = checkov_reports[overlay]
    assert len(results["passed"]) > 50, "checkov evaluated little or nothing"
    failures = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in results["failed"]]
    assert failures == []
    skips = _skip_annotations(rendered[overlay])
    assert {check for _, check, _ in skips} == set(ALLOWED_CHECKOV_SKIPS), "list every checkov skip in this test"
    assert all(reason for _, _, reason in skips), "every checkov skip needs a reason"
    assert sorted((c["check_id"]) for c in results["skipped"]) == sorted(check for _, check, _ in skips)


# ---------------------------------------------------------------------------------------------
# Apply order


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_object_has_a_stage_and_the_namespace(rendered: dict[str, list[Object]], overlay: str) -> None:
    for obj in rendered[overlay]:
        metadata = obj["metadata"]
        assert metadata["labels"].get("medinfer.io/stage") in STAGES, f"{obj['kind']}/{metadata['name']}"
        assert metadata["labels"].get("app.kubernetes.io/part-of") == "medinfer"
        if obj["kind"] != "Namespace":
            assert metadata.get("namespace") == NAMESPACE


def test_stages_come_in_dependency_order(rendered: dict[str, list[Object]]) -> None:
    objects = rendered["cpu"]
    stage = {(o["kind"], o["metadata"]["name"]): o["metadata"]["labels"]["medinfer.io/stage"] for o in objects}
    assert stage[("Namespace", NAMESPACE)] == "prerequisites"
    assert stage[("ServiceAccount", "medinfer")] == "prerequisites"
    assert stage[("Cluster", "medinfer-db")] == "database"
    assert stage[("Job", "medinfer-migrate")] == "migration"
    assert stage[SERVER] == "service"
    assert stage[("Service", "medinfer-headless")] == "service", "the StatefulSet's governing Service"
    job = find(objects, "Job", "medinfer-migrate")
    service_account = kustomize.pod_specs(job)[0]["serviceAccountName"]
    assert STAGES.index(stage[("ServiceAccount", service_account)]) < STAGES.index("migration")
    # The documented procedure applies the stages in this order, with a wait after each.
    docs = OPERATIONS.read_text(encoding="utf-8")
    positions = [docs.find(f"-l medinfer.io/stage={name}") for name in STAGES[:3]]
    assert all(p >= 0 for p in positions), "docs/operations.md must show `kubectl apply -k ... -l medinfer.io/stage=`"
    assert positions == sorted(positions)
    assert docs.find("kubectl -n medinfer create secret generic medinfer-secrets") < positions[1]
    assert "wait --for=condition=complete job/medinfer-migrate" in docs
    assert "delete job medinfer-migrate --ignore-not-found" in docs


# ---------------------------------------------------------------------------------------------
# The server (StatefulSet)


def _graceful_shutdown_s() -> int:
    source = (REPO / "app" / "transport" / "http" / "server.py").read_text(encoding="utf-8")
    match = re.search(r'"timeout_graceful_shutdown":\s*(\d+)', source)
    assert match, "app/transport/http/server.py no longer sets uvicorn's timeout_graceful_shutdown"
    return int(match.group(1))


def _dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    return dict(re.findall(r"\b(MEDINFER_[A-Z_]+)=(\S+?)\s*\\?$", text, re.MULTILINE))


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_probes_and_graceful_shutdown(rendered: dict[str, list[Object]], overlay: str) -> None:
    server = find(rendered[overlay], *SERVER)
    main = container(server)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    for probe, path in PROBE_PATHS.items():
        check = main[probe]["httpGet"]
        assert check["path"] == path, probe
        assert ports.get(check["port"], check["port"]) == HTTP_PORT, probe
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "models need minutes to load: be generous"
    assert main["readinessProbe"]["timeoutSeconds"] >= 3, "/readyz runs SELECT 1 with a 2 s timeout"
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = int(pre_stop[1])
    assert 5 <= sleep_s <= 15
    grace = kustomize.pod_specs(server)[0]["terminationGracePeriodSeconds"]
    assert grace <= 300, "a rollout waits for each pod's stop: keep it bounded"
    # After uvicorn's drain the service infers the studies still waiting in its spool, for up to
    # MEDINFER_STUDY_DRAIN_S; all of it must end before SIGKILL, with room for the batchers, the
    # audit writer and the outbox to stop.
    assert "study_drain_s" in Settings.model_fields, "MEDINFER_STUDY_DRAIN_S is no longer a setting"
    study_drain_s = float(env_of(server)["MEDINFER_STUDY_DRAIN_S"]["value"])
    assert study_drain_s >= Settings.model_fields["study_drain_s"].default, "Kubernetes gives the drain more, not less"
    assert sleep_s + _graceful_shutdown_s() + study_drain_s + 10 <= grace, "the study drain must end before SIGKILL"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
@pytest.mark.parametrize("kind_name", [SERVER, ("Job", "medinfer-migrate")])
def test_pods_are_hardened(rendered: dict[str, list[Object]], overlay: str, kind_name: tuple[str, str]) -> None:
    obj = find(rendered[overlay], *kind_name)
    pod = kustomize.pod_specs(obj)[0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "medinfer"
    assert find(rendered[overlay], "ServiceAccount", "medinfer")["automountServiceAccountToken"] is False
    # With service links, the Service `medinfer` would inject MEDINFER_PORT=tcp://..., which the
    # settings would read as the port.
    assert pod["enableServiceLinks"] is False
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == RUNTIME_UID
    assert context["runAsGroup"] == RUNTIME_UID
    assert context["fsGroup"] == RUNTIME_UID
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    main = container(obj)
    own = main["securityContext"]
    assert own["runAsNonRoot"] is True
    assert own["runAsUser"] == RUNTIME_UID
    assert own["allowPrivilegeEscalation"] is False
    assert own["privileged"] is False
    assert own["readOnlyRootFilesystem"] is True
    assert own["capabilities"] == {"drop": ["ALL"]}
    assert own["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("requests", "limits"):
        assert {"cpu", "memory", "ephemeral-storage"} <= set(main["resources"][key]), key
    # Writable: only the data dir (the server's own claim, the Job's emptyDir) and /tmp (emptyDir);
    # everything else read-only.
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])}
    assert not claims & set(volumes), "a pod volume would shadow the claim of the same name"
    writable = {m["mountPath"] for m in main["volumeMounts"] if not m.get("readOnly")}
    # The server also appends signed audit checkpoints to a claim of its own.
    expected = {DATA_DIR, "/tmp"} | ({CHECKPOINT_DIR} if kind_name == SERVER else set())  # noqa: S108
    assert writable == expected
    for mount in main["volumeMounts"]:
        if mount["name"] in claims:
            assert not mount.get("readOnly"), mount
            continue
        volume = volumes[mount["name"]]
        if mount.get("readOnly"):
            assert "secret" in volume, mount
        else:
            assert volume["emptyDir"]["sizeLimit"], mount


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_service_environment(rendered: dict[str, list[Object]], overlay: str) -> None:
    server = find(rendered[overlay], *SERVER)
    env = env_of(server)
    image_env = _dockerfile_env()
    assert env["MEDINFER_ENV"]["value"] == "production"
    assert env["MEDINFER_HOST"]["value"] == "0.0.0.0"  # noqa: S104 - inside the pod, behind the Service
    assert env["MEDINFER_PORT"]["value"] == str(HTTP_PORT) == image_env["MEDINFER_PORT"]
    assert env["MEDINFER_MODEL_REPOSITORY"]["value"] == image_env["MEDINFER_MODEL_REPOSITORY"]
    assert env["MEDINFER_DATA_DIR"]["value"] == image_env["MEDINFER_DATA_DIR"]
    assert env["MEDINFER_WORKERS"]["value"] == "1", "one worker per pod: scale with replicas"
    keys_dir = env["MEDINFER_KEYS_DIR"]["value"]
    keys_mount = next(m for m in container(server)["volumeMounts"] if m["mountPath"] == keys_dir)
    assert keys_mount["readOnly"] is True
    volume = next(v for v in kustomize.pod_specs(server)[0]["volumes"] if v["name"] == keys_mount["name"])
    assert volume["secret"]["secretName"] == "medinfer-jwe-keys"
    ports = {p["name"]: p["containerPort"] for p in container(server)["ports"]}
    assert ports == {"http": HTTP_PORT, "dicom": DICOM_PORT}
    assert container(server)["command"] == ["medinfer", "serve"]


def _secret_settings() -> set[str]:
    """MEDINFER_* variables of every secret setting (SecretStr fields of app.config.Settings)."""
    return {f"MEDINFER_{name.upper()}" for name, f in Settings.model_fields.items() if f.annotation is SecretStr}


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
@pytest.mark.parametrize("kind_name", [SERVER, ("Job", "medinfer-migrate")])
def test_secrets_come_from_secrets(rendered: dict[str, list[Object]], overlay: str, kind_name: tuple[str, str]) -> None:
    obj = find(rendered[overlay], *kind_name)
    env = env_of(obj)
    # MEDINFER_ENV=production refuses to start without each of them, the migration Job included.
    for name in _secret_settings() | {"PGPASSWORD"}:
        assert name in env, f"{kind_name[0]} lacks {name}"
        assert "value" not in env[name], f"{name} must not be a literal"
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] in {
            "medinfer-secrets",
            "medinfer-db-app",
            "medinfer-db-service",
        }
    for name, entry in env.items():
        if re.search(r"_KEY$|SECRET|PASSWORD|TOKEN", name):
            assert "valueFrom" in entry, f"{name} is a literal"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_database_url_points_at_the_cnpg_cluster(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    cluster = find(objects, "Cluster", "medinfer-db")
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    (service_role,) = cluster["spec"]["managed"]["roles"]
    assert service_role["login"] is True
    assert not any(service_role[k] for k in ("superuser", "createdb", "createrole", "inherit", "replication"))
    job = find(objects, "Job", "medinfer-migrate")
    assert env_of(job)["MEDINFER_DATABASE_SERVICE_ROLE"]["value"] == service_role["name"]
    # The Job migrates as the owner (the CNPG app Secret); the service runs as a role that owns nothing.
    logins = {
        SERVER: (service_role["name"], service_role["passwordSecret"]["name"]),
        ("Job", "medinfer-migrate"): (initdb["owner"], f"{cluster['metadata']['name']}-app"),
    }
    assert service_role["name"] != initdb["owner"]
    for (kind, name), (username, password_secret) in logins.items():
        obj = find(objects, kind, name)
        url = urlsplit(env_of(obj)["MEDINFER_DATABASE_URL"]["value"])
        assert url.scheme == "postgresql+psycopg", "psycopg 3 is the driver the image installs"
        assert url.username == username
        assert url.password is None, "the password comes from PGPASSWORD (the CNPG app Secret), not the URL"
        assert url.hostname == f"{cluster['metadata']['name']}-rw", "the read-write Service of the cluster"
        assert url.port == 5432
        assert url.path == f"/{initdb['database']}"
        query = parse_qs(url.query)
        assert query["sslmode"] == ["verify-full"]
        ca_dir = str(Path(query["sslrootcert"][0]).parent)
        mount = next(m for m in container(obj)["volumeMounts"] if m["mountPath"] == ca_dir)
        volume = next(v for v in kustomize.pod_specs(obj)[0]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == f"{cluster['metadata']['name']}-ca"
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], "never the CA's private key"
        assert env_of(obj)["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": password_secret, "key": "password"}


def _version() -> str:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_image_is_pinned_to_the_release(rendered: dict[str, list[Object]], overlay: str) -> None:
    images = {container(o)["image"] for o in rendered[overlay] if kustomize.pod_specs(o)}
    assert images == {f"medinfer:{_version()}"}, "server and migration run the same pinned image"
    for obj in rendered[overlay]:
        if kustomize.pod_specs(obj):
            assert container(obj)["imagePullPolicy"] == "Always"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_replicas_rollout_and_spread(rendered: dict[str, list[Object]], overlay: str) -> None:
    server = find(rendered[overlay], *SERVER)
    spec = server["spec"]
    assert server["apiVersion"] == "apps/v1"
    assert spec["replicas"] == 3
    # Rolling, one pod at a time (each stops, draining its spool, and returns on its volume), and
    # every ordinal updated: a partition would leave the lower ordinals on the old image.
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["updateStrategy"].get("rollingUpdate", {}).get("partition", 0) == 0
    assert "maxUnavailable" not in spec["updateStrategy"].get("rollingUpdate", {})
    assert spec["minReadySeconds"] > 0
    # The ordinals have no roles: a replica that cannot start must not hold back the others.
    assert spec["podManagementPolicy"] == "Parallel"
    assert matches(spec["selector"]["matchLabels"], pod_labels(server))
    constraints = kustomize.pod_specs(server)[0]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in constraints:
        assert constraint["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
        assert constraint["maxSkew"] == 1
        # Deployment pods' label: a StatefulSet's pods do not carry it, and are replaced in place.
        assert "pod-template-hash" not in constraint.get("matchLabelKeys", [])
        # A pod is bound to its (usually zonal) volume: a hard spread could leave it unschedulable.
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", constraint["topologyKey"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_data_volume_is_a_claim_per_pod(
    rendered: dict[str, list[Object]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = find(rendered[overlay], *SERVER)
    spec = server["spec"]
    env = env_of(server)
    pod = kustomize.pod_specs(server)[0]
    data_mount = next(m for m in container(server)["volumeMounts"] if m["mountPath"] == DATA_DIR)
    assert env["MEDINFER_DATA_DIR"]["value"] == DATA_DIR
    assert not data_mount.get("readOnly")
    # The data dir is the pod's own claim, which outlives the pod: not an emptyDir.
    claim = next(c for c in spec["volumeClaimTemplates"] if c["metadata"]["name"] == data_mount["name"])
    checkpoints = next(c for c in spec["volumeClaimTemplates"] if c["metadata"]["name"] != data_mount["name"])
    checkpoint_mount = next(
        m for m in container(server)["volumeMounts"] if m["name"] == checkpoints["metadata"]["name"]
    )
    assert checkpoint_mount["mountPath"] == env["MEDINFER_AUDIT_CHECKPOINT_DIR"]["value"] == CHECKPOINT_DIR
    assert not Path(CHECKPOINT_DIR).is_relative_to(DATA_DIR), "checkpoints on a claim apart from the spool"
    assert checkpoints["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert data_mount["name"] not in {v["name"] for v in pod["volumes"]}
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], "one claim per pod, from the template"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in claim["spec"], "the cluster's default class: the site chooses"
    size = claim["spec"]["resources"]["requests"]["storage"]
    assert re.fullmatch(r"\d+Gi", size)
    assert int(size.removesuffix("Gi")) >= 10, "room for a few large studies in flight"
    # The claims carry the pods' labels: `kubectl get pvc -l app.kubernetes.io/name=medinfer` lists them.
    assert matches(spec["selector"]["matchLabels"], claim["metadata"]["labels"])
    # A claim is released only by an operator: after a crash the spool of a scaled-away (or
    # deleted) ordinal waits on it until that ordinal runs again.
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # The spool lies on that claim, as the service resolves it from the pod's environment, and
    # not under a read-only mount nested in it (the JWE keys).
    assert "MEDINFER_DICOM_SPOOL_DIR" not in env or Path(env["MEDINFER_DICOM_SPOOL_DIR"]["value"]).is_relative_to(
        DATA_DIR
    )
    for name in ("MEDINFER_DATA_DIR", "MEDINFER_DICOM_SPOOL_DIR"):
        if name in env:
            monkeypatch.setenv(name, env[name]["value"])
        else:
            monkeypatch.delenv(name, raising=False)
    spool = Settings().resolved_spool_dir
    assert spool.is_relative_to(DATA_DIR)
    assert spool != Path(DATA_DIR)
    mounts = sorted(container(server)["volumeMounts"], key=lambda m: len(m["mountPath"]))
    innermost = [m for m in mounts if spool.is_relative_to(m["mountPath"])][-1]
    assert innermost is data_mount, f"the spool would be on {innermost['name']}"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_statefulset_is_governed_by_a_headless_service(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    server = find(objects, *SERVER)
    governing = find(objects, "Service", server["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert matches(governing["spec"]["selector"], pod_labels(server))
    # It names the pods; it serves nothing (HTTP and DICOM have their own Services).
    assert not governing["spec"].get("ports")
    assert governing["metadata"]["name"] not in {"medinfer", "medinfer-dicom"}


def test_gpu_resources_only_in_the_gpu_overlay(rendered: dict[str, list[Object]]) -> None:
    assert "nvidia.com" not in yaml.safe_dump_all(rendered["cpu"])
    for name in ("cpu", "gpu"):
        job = find(rendered[name], "Job", "medinfer-migrate")
        assert "nvidia.com/gpu" not in container(job)["resources"]["limits"], "migrations need no GPU"
    server = find(rendered["gpu"], *SERVER)
    resources = container(server)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in resources["requests"], "extended resources are requested through limits"
    pod = kustomize.pod_specs(server)[0]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Everything else of the base survives the patch.
    assert {"cpu", "memory", "ephemeral-storage"} <= set(resources["limits"])
    hpa = find(rendered["gpu"], "HorizontalPodAutoscaler", "medinfer")
    assert (
        hpa["spec"]["maxReplicas"] < find(rendered["cpu"], "HorizontalPodAutoscaler", "medinfer")["spec"]["maxReplicas"]
    )


def _in_cluster_service_to_the_server(objects: list[Object], name: str) -> tuple[Object, Object]:
    """The ClusterIP Service ``name`` and the server it sends to (never the migration Job's pod)."""
    service = find(objects, "Service", name)
    server = find(objects, *SERVER)
    job = find(objects, "Job", "medinfer-migrate")
    selector = service["spec"]["selector"]
    assert matches(selector, server["spec"]["template"]["metadata"]["labels"])
    assert not matches(selector, job["spec"]["template"]["metadata"]["labels"]), "the Job's pod takes no traffic"
    assert service["spec"]["type"] == "ClusterIP"
    return service, server


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_http_service_is_balanced_per_connection(rendered: dict[str, list[Object]], overlay: str) -> None:
    service, server = _in_cluster_service_to_the_server(rendered[overlay], "medinfer")
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", HTTP_PORT)
    assert port["targetPort"] in {p["name"] for p in container(server)["ports"]}
    # HIS traffic often arrives from one ingress IP: affinity would pin all of it to one pod.
    assert service["spec"].get("sessionAffinity", "None") == "None"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_dicom_service_pins_each_pacs_to_one_pod(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    service, server = _in_cluster_service_to_the_server(objects, "medinfer-dicom")
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["protocol"]) == ("dicom", DICOM_PORT, "TCP")
    container_ports = {p["name"]: p["containerPort"] for p in container(server)["ports"]}
    assert container_ports[port["targetPort"]] == int(env_of(server)["MEDINFER_DIMSE_PORT"]["value"])
    # A study settles in the memory of the pod that received it; a PACS sends it over several
    # associations. ClientIP affinity keeps them on one pod, for far longer than a study settles.
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    timeout_s = service["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"]
    settle_s = Settings.model_fields["study_settle_s"].default
    assert 60 * settle_s <= timeout_s <= 10800
    # No other way in for DICOM that would bypass the affinity.
    for other in objects:
        if other["kind"] == "Service" and other is not service:
            assert DICOM_PORT not in {p["port"] for p in other["spec"].get("ports", [])}, other["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_replica_runs_the_scp(
    rendered: dict[str, list[Object]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[overlay]
    server = find(objects, *SERVER)
    env = env_of(server)
    assert env["MEDINFER_DIMSE_ENABLED"]["value"] == "true"
    assert env["MEDINFER_DIMSE_HOST"]["value"] == "0.0.0.0"  # noqa: S104 - inside the pod, behind medinfer-dicom
    ports = {p["name"]: p["containerPort"] for p in container(server)["ports"]}
    assert int(env["MEDINFER_DIMSE_PORT"]["value"]) == ports["dicom"] == DICOM_PORT
    # The per-site values come from the ConfigMap, key for key.
    site = find(objects, "ConfigMap", SITE_CONFIG)
    assert set(site["data"]) == SITE_SETTINGS
    for name in SITE_SETTINGS:
        assert env[name]["valueFrom"]["configMapKeyRef"] == {"name": SITE_CONFIG, "key": name}
    assert not SITE_SETTINGS & set(env_of(find(objects, "Job", "medinfer-migrate"))), "migrations need no PACS"
    # The service reads them as the rendered pod would have them.
    literal = {
        name: entry["value"] for name, entry in env.items() if name.startswith("MEDINFER_DIMSE_") and "value" in entry
    }
    for name, value in {**literal, **{name: site["data"][name] for name in SITE_SETTINGS}}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.dimse_enabled is True
    assert settings.dimse_ae_title == "MEDINFER"
    assert settings.dimse_allowed_calling_aes, "an empty allow-list lets any calling AE associate"
    assert all(0 < len(ae) <= 16 for ae in settings.dimse_allowed_calling_aes)
    # Empty holds results in the outbox; anything else must be a destination the sender takes.
    assert (pacs_sender(settings) is None) == (not settings.pacs_destination)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_as_shipped_no_demonstration_model_serves_and_nothing_is_routed_to_one(
    rendered: dict[str, list[Object]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hospital that applies the manifests as shipped sends nothing a demonstration model made
    to its PACS: production, nothing acknowledged, no routing rule, and every model in the image
    (models/) is not_for_clinical_use, so the production gate serves none of them."""
    objects = rendered[overlay]
    env = env_of(find(objects, *SERVER))
    site = find(objects, "ConfigMap", SITE_CONFIG)["data"]
    assert env["MEDINFER_ENV"]["value"] == "production"
    assert json.loads(site["MEDINFER_IMAGING_ROUTES"]) == []
    assert json.loads(site["MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS"]) == []
    for name in [k for k in os.environ if k.startswith("MEDINFER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MEDINFER_ENV", "production")
    for name in _secret_settings():
        monkeypatch.setenv(name, "a-real-secret-of-at-least-forty-characters-long")
    for name in ("MEDINFER_IMAGING_ROUTES", "MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS"):
        monkeypatch.setenv(name, site[name])
    settings = Settings()
    assert not (parse_routes(settings.imaging_routes) if settings.imaging_routes else ())
    policy = clinical_use_policy(settings)
    specs = [load_spec(d) for d in iter_model_dirs(REPO / "models")]
    assert specs
    assert all(policy.refuses(spec, v) for spec in specs for v in spec.served_versions())
    assert all(policy.withholds_results(spec) for spec in specs)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_pod_disruption_budget(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    pdb = find(objects, "PodDisruptionBudget", "medinfer")
    server = find(objects, *SERVER)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels(server))
    job = find(objects, "Job", "medinfer-migrate")
    assert not matches(pdb["spec"]["selector"]["matchLabels"], pod_labels(job)), "the Job's pod is not a replica"
    spec = pdb["spec"]
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 2
    replicas = find(objects, "HorizontalPodAutoscaler", "medinfer")["spec"]["minReplicas"]
    assert replicas - spec.get("minAvailable", replicas - spec.get("maxUnavailable", 0)) >= 1, "drains must progress"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_autoscaler_uses_the_queue_depth_through_prometheus_adapter(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    objects = rendered[overlay]
    hpa = find(objects, "HorizontalPodAutoscaler", "medinfer")
    assert hpa["apiVersion"] == "autoscaling/v2"
    kind, name = SERVER
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": kind, "name": name}
    assert hpa["spec"]["minReplicas"] == find(objects, *SERVER)["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert app_metric_families().get(HPA_METRIC) == "gauge", f"{HPA_METRIC} is not a gauge of the service"
    # prometheus-adapter publishes the series under the same name, one value per pod.
    values = load_yaml(ADAPTER_VALUES)
    assert values["rules"]["default"] is False
    rules = [r for r in values["rules"]["custom"] if r["name"]["as"] == HPA_METRIC]
    assert len(rules) == 1
    rule = rules[0]
    assert rule["seriesQuery"].startswith(HPA_METRIC + "{")
    assert re.fullmatch(rule["name"]["matches"], HPA_METRIC)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert rule["metricsQuery"].replace(" ", "") == "sum(<<.Series>>{<<.LabelMatchers>>})by(<<.GroupBy>>)"


Peer = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]


def _peer(namespace: dict[str, str] | None = None, pod: dict[str, str] | None = None) -> Peer:
    """A NetworkPolicy peer; both selectors in one peer means both must match (AND)."""
    return tuple(sorted((namespace or {}).items())), tuple(sorted((pod or {}).items()))


def _rule(entry: Object) -> tuple[frozenset[Peer], frozenset[tuple[str, int]]]:
    peers = frozenset(
        _peer(p.get("namespaceSelector", {}).get("matchLabels"), p.get("podSelector", {}).get("matchLabels"))
        for p in entry.get("from", entry.get("to", []))
    )
    return peers, frozenset((p["protocol"], p["port"]) for p in entry["ports"])


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_network_policy(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    policy = find(objects, "NetworkPolicy", "medinfer")["spec"]
    cluster_name = find(objects, "Cluster", "medinfer-db")["metadata"]["name"]
    for kind, name in (SERVER, ("Job", "medinfer-migrate")):
        labels = find(objects, kind, name)["spec"]["template"]["metadata"]["labels"]
        assert matches(policy["podSelector"]["matchLabels"], labels), f"the policy must cover the {kind}'s pods"
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]

    assert {_rule(r) for r in policy["ingress"]} == {
        (frozenset({_peer(namespace={"medinfer.io/client": "his"})}), frozenset({("TCP", HTTP_PORT)})),
        (frozenset({_peer(namespace={"medinfer.io/client": "pacs"})}), frozenset({("TCP", DICOM_PORT)})),
        (
            frozenset(
                {
                    _peer(
                        namespace={"kubernetes.io/metadata.name": "monitoring"},
                        pod={"app.kubernetes.io/name": "prometheus"},
                    )
                }
            ),
            frozenset({("TCP", HTTP_PORT)}),
        ),
    }
    assert {_rule(r) for r in policy["egress"]} == {
        (frozenset({_peer(pod={"cnpg.io/cluster": cluster_name})}), frozenset({("TCP", 5432)})),
        (
            frozenset({_peer(namespace={"kubernetes.io/metadata.name": "kube-system"}, pod={"k8s-app": "kube-dns"})}),
            frozenset({("TCP", 53), ("UDP", 53)}),
        ),
        # The outbox delivers SR results to the PACS, the same namespaces the SCP accepts.
        (frozenset({_peer(namespace={"medinfer.io/client": "pacs"})}), frozenset(("TCP", p) for p in PACS_PORTS)),
    }
    destination = find(objects, "ConfigMap", SITE_CONFIG)["data"]["MEDINFER_PACS_DESTINATION"]
    if destination:
        port = urlsplit(destination).port or {"https": 443, "http": 80}.get(urlsplit(destination).scheme)
        assert port in PACS_PORTS, f"the NetworkPolicy does not let the pods reach {destination}"
    database = find(objects, "NetworkPolicy", "medinfer-db")["spec"]
    assert database["podSelector"]["matchLabels"] == {"cnpg.io/cluster": cluster_name}
    from_medinfer = (frozenset({_peer(pod={"app.kubernetes.io/name": "medinfer"})}), frozenset({("TCP", 5432)}))
    assert from_medinfer in {_rule(r) for r in database["ingress"]}


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_migration_job(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    job = find(objects, "Job", "medinfer-migrate")
    server = find(objects, *SERVER)
    spec = job["spec"]
    assert container(job)["command"] == ["medinfer", "migrate"]
    assert 1 <= spec["backoffLimit"] <= 5
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert kustomize.pod_specs(job)[0]["restartPolicy"] == "Never"
    assert container(job)["image"] == container(server)["image"]
    job_env, server_env = env_of(job), env_of(server)
    for name in ("MEDINFER_ENV", *_secret_settings()):
        assert job_env[name] == server_env[name], f"{name}: the Job migrates the database the service uses"
    job_url = urlsplit(job_env["MEDINFER_DATABASE_URL"]["value"])
    server_url = urlsplit(server_env["MEDINFER_DATABASE_URL"]["value"])
    assert job_url._replace(netloc=job_url.hostname or "") == server_url._replace(netloc=server_url.hostname or "")
    assert job_url.port == server_url.port
    assert job_url.username != server_url.username, "the Job as the owner, the service as its own role"
    assert "probe" not in " ".join(container(job)), "a one-shot Job has nothing to probe"


def test_secret_templates_hold_no_values(rendered: dict[str, list[Object]]) -> None:
    templates = [doc for path in sorted(SECRET_TEMPLATES.glob("*.yaml")) for doc in load_yaml_documents(path)]
    assert templates
    assert all(t["kind"] == "Secret" for t in templates)
    for template in templates:
        values = {**(template.get("stringData") or {}), **(template.get("data") or {})}
        assert all(v in {"", None} for v in values.values()), f"{template['metadata']['name']} holds a value"
    provided = {t["metadata"]["name"]: set(t.get("stringData") or {}) for t in templates}
    cluster_name = find(rendered["cpu"], "Cluster", "medinfer-db")["metadata"]["name"]
    made_by_cnpg = {f"{cluster_name}-app", f"{cluster_name}-ca"}
    for overlay in OVERLAY_NAMES:
        for obj in rendered[overlay]:
            for pod in kustomize.pod_specs(obj):
                for entry in pod["containers"][0]["env"]:
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    if ref and ref["name"] not in made_by_cnpg:
                        assert ref["key"] in provided[ref["name"]], f"the template lacks {ref['name']}/{ref['key']}"
                for volume in pod["volumes"]:
                    if "secret" in volume:
                        assert volume["secret"]["secretName"] in set(provided) | made_by_cnpg
    # No kustomization may pick the templates up.
    for kustomization in sorted((REPO / "deploy" / "kubernetes").rglob("kustomization.yaml")):
        for resource in load_yaml(kustomization).get("resources", []):
            path = (kustomization.parent / resource).resolve()
            assert not path.is_relative_to(SECRET_TEMPLATES.resolve()), f"{kustomization} applies {resource}"


def test_cnpg_cluster(rendered: dict[str, list[Object]]) -> None:
    cluster = find(rendered["cpu"], "Cluster", "medinfer-db")
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert spec["instances"] == 3
    assert spec["bootstrap"]["initdb"]["database"] == "medinfer"
    assert spec["bootstrap"]["initdb"]["owner"] == "medinfer"
    assert re.fullmatch(r"\d+(Gi|Ti)", spec["storage"]["size"])
    assert spec["postgresql"]["synchronous"]["number"] >= 1, "an answered audit event survives a failover"
    assert spec["affinity"]["podAntiAffinityType"] == "required"
    assert spec["enableSuperuserAccess"] is False
    # The same PostgreSQL major as the compose stack.
    compose = load_yaml(REPO / "docker-compose.yml")
    compose_major = compose["services"]["postgres"]["image"].split(":")[1].split(".")[0]
    repository, _, tag = spec["imageName"].rpartition(":")
    assert repository == "ghcr.io/cloudnative-pg/postgresql"
    assert re.fullmatch(r"\d+\.\d+", tag), "pin a PostgreSQL minor"
    assert tag.split(".")[0] == compose_major


def test_service_monitor_scrapes_the_service(rendered: dict[str, list[Object]]) -> None:
    objects = rendered["cpu"]
    monitor = find(objects, "ServiceMonitor", "medinfer")["spec"]
    service = find(objects, "Service", "medinfer")
    selected = [
        o
        for o in objects
        if o["kind"] == "Service" and matches(monitor["selector"]["matchLabels"], o["metadata"]["labels"])
    ]
    assert selected == [service], "only the HTTP Service: the DICOM one has no /metrics"
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The alert rules select job="medinfer": the job label comes from this Service label.
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "medinfer"


def test_base_kustomization_is_the_one_the_overlays_use() -> None:
    for overlay in OVERLAY_NAMES:
        kustomization = load_yaml(OVERLAYS / overlay / "kustomization.yaml")
        assert [(OVERLAYS / overlay / r).resolve() for r in kustomization["resources"]] == [BASE.resolve()]


#: ``kubectl`` resource forms a workload is named by: ``deployment/x``, ``deploy/x``, ``sts/x``...
_WORKLOAD_REF = re.compile(r"\b(deployments?|deploy|statefulsets?|sts|daemonsets?|ds)/medinfer\b")


def test_documented_commands_name_the_statefulset(rendered: dict[str, list[Object]]) -> None:
    """Every `kind/medinfer` in the manifests' comments and in the install and operations part of
    docs/operations.md (before its metrics and runbooks) names the server's kind."""
    assert [o["kind"] for o in rendered["cpu"] if kustomize.pod_specs(o) and o["kind"] != "Job"] == [SERVER[0]]
    docs = OPERATIONS.read_text(encoding="utf-8")
    texts = {"docs/operations.md": docs[: docs.index("\n## Metrics\n")]}
    for path in sorted((REPO / "deploy" / "kubernetes").rglob("*.yaml")):
        texts[str(path.relative_to(REPO))] = path.read_text(encoding="utf-8")
    wrong = {
        f"{name}: {match.group(0)}"
        for name, text in texts.items()
        for match in _WORKLOAD_REF.finditer(text)
        if match.group(1) not in {"statefulset", "statefulsets", "sts"}
    }
    assert not wrong, sorted(wrong)
    assert "rollout status statefulset/medinfer" in texts["docs/operations.md"]
    assert "rollout restart statefulset/medinfer" in texts["docs/operations.md"]
    for path in sorted(OVERLAYS.rglob("*.yaml")):
        assert "kind: Deployment" not in path.read_text(encoding="utf-8"), f"{path}: patches a Deployment"
