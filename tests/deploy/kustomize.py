"""A small kustomize renderer for the subset deploy/kubernetes uses, so the tests run offline.

No kustomize binary ships through PyPI or Debian for this project's machines, so this renders
kustomizations itself. It supports exactly what our kustomizations use and refuses anything
else, loudly, rather than rendering it wrong:

- ``resources``: files (one or more YAML documents) and directories holding a kustomization;
- ``namespace``: set on every namespaced object;
- ``images``: ``name`` with ``newName``, ``newTag`` and/or ``digest``, applied to containers and
  init containers of Pods, workloads and Jobs;
- ``patches``: entries with only ``path``, a strategic-merge patch whose kind and name select its
  target. Merge semantics: maps merge recursively and ``null`` deletes a key; the lists that
  Kubernetes merges by key (containers, initContainers, env, volumes, volumeMounts,
  imagePullSecrets) merge by that key; every other list is replaced. ``$patch`` directives are
  refused.

Output order follows the resources; ``test_kubernetes.py`` compares the result, object by object,
with ``kubectl kustomize`` when a kubectl is on PATH.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "namespace", "resources", "patches", "images"})
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
        "IngressClass",
        "RuntimeClass",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "APIService",
    }
)
#: List fields Kubernetes' strategic merge merges by a key instead of replacing.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}

Object = dict[str, Any]


class UnsupportedKustomizationError(ValueError):
    """The kustomization uses a feature this renderer does not implement."""


def _documents(path: Path) -> list[Object]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _kustomization_file(directory: Path) -> Path:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            return directory / name
    msg = f"{directory}: no kustomization file"
    raise UnsupportedKustomizationError(msg)


def render(directory: Path) -> list[Object]:
    """Render the kustomization in ``directory`` into a list of objects."""
    kustomization = yaml.safe_load(_kustomization_file(directory).read_text(encoding="utf-8"))
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        msg = f"{directory}: kustomization fields {sorted(unsupported)} are not supported by tests/deploy/kustomize.py"
        raise UnsupportedKustomizationError(msg)
    objects: list[Object] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects.extend(render(path) if path.is_dir() else _documents(path))
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            msg = f"{directory}: only `patches: - path: FILE` is supported, got {patch_entry}"
            raise UnsupportedKustomizationError(msg)
        for patch in _documents(directory / patch_entry["path"]):
            _apply_patch(objects, patch, directory / patch_entry["path"])
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        _apply_image(objects, image)
    return objects


def _apply_patch(objects: list[Object], patch: Object, source: Path) -> None:
    group = patch["apiVersion"].rpartition("/")[0]
    targets = [
        obj
        for obj in objects
        if obj["kind"] == patch["kind"]
        and obj["apiVersion"].rpartition("/")[0] == group
        and obj["metadata"]["name"] == patch["metadata"]["name"]
        and patch["metadata"].get("namespace", obj["metadata"].get("namespace")) == obj["metadata"].get("namespace")
    ]
    if len(targets) != 1:
        msg = f"{source}: patch {patch['kind']}/{patch['metadata']['name']} matches {len(targets)} objects, not 1"
        raise UnsupportedKustomizationError(msg)
    body = {k: v for k, v in patch.items() if k not in {"apiVersion", "kind"}}
    merged = strategic_merge(targets[0], body)
    targets[0].clear()
    targets[0].update(merged)


def strategic_merge(original: Any, patch: Any, field: str | None = None) -> Any:
    """Merge ``patch`` into a copy of ``original`` with the subset of strategic-merge semantics above."""
    if isinstance(patch, dict):
        if any(str(key).startswith("$") for key in patch):
            msg = f"strategic-merge directives are not supported: {sorted(k for k in patch if str(k).startswith('$'))}"
            raise UnsupportedKustomizationError(msg)
        result = copy.deepcopy(original) if isinstance(original, dict) else {}
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = strategic_merge(result.get(key), value, key)
        return result
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(original, list):
        key = MERGE_KEYS[field]
        result_list = copy.deepcopy(original)
        for item in patch:
            match = next((i for i, existing in enumerate(result_list) if existing.get(key) == item[key]), None)
            if match is None:
                result_list.append(copy.deepcopy(item))
            else:
                result_list[match] = strategic_merge(result_list[match], item, None)
        return result_list
    return copy.deepcopy(patch)


def pod_specs(obj: Object) -> list[Object]:
    """The pod specs inside an object: a Pod's own, a workload's template, a CronJob's job template."""
    spec = obj.get("spec") or {}
    if obj["kind"] == "Pod":
        return [spec]
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [spec["template"]["spec"]]
    return []


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        return name, tag, digest or None
    return name, None, digest or None


def _apply_image(objects: list[Object], image: Object) -> None:
    unsupported = set(image) - {"name", "newName", "newTag", "digest"}
    if unsupported:
        msg = f"images: fields {sorted(unsupported)} are not supported"
        raise UnsupportedKustomizationError(msg)
    for obj in objects:
        for spec in pod_specs(obj):
            for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                name, tag, digest = _split_image(container["image"])
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{name}@{image['digest']}"
                elif "newTag" in image:
                    container["image"] = f"{name}:{image['newTag']}"
                else:
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
