"""Static checks of the container files: Dockerfile, .dockerignore, docker-compose.yml, deploy/compose/.

Nothing here needs a Docker engine or the network: the files are parsed and their important
properties asserted, and checkov (installed by ``make test`` into ``.venv-checkov``) scans the
Dockerfile and, for secrets, the compose files. No image is built and no container runs here.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support.checkov import checkov_path, run_checkov

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_DIR = REPO / "deploy" / "compose"
GPU_OVERRIDE = COMPOSE_DIR / "gpu.yml"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus.yml"
GRAFANA_DATASOURCES = COMPOSE_DIR / "grafana" / "provisioning" / "datasources"
ORTHANC_CONFIG = COMPOSE_DIR / "orthanc.json"
ORTHANC_ROUTE = COMPOSE_DIR / "orthanc-route-to-medinfer.lua"
TEST_SERVICES = REPO / "scripts" / "test-services.sh"

SERVICES = {"medinfer", "postgres", "migrate", "prometheus", "grafana", "orthanc"}
HTTP_PORT = 8000
DICOM_PORT = 11112
RUNTIME_UID = 10001
#: The settings only the serving container has: its C-STORE SCP, which model reads which study,
#: which demonstration models it acknowledges, and where its SR results go.
DIMSE_SETTINGS = frozenset(
    {
        "MEDINFER_IMAGING_ROUTES",
        "MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS",
        "MEDINFER_DIMSE_ENABLED",
        "MEDINFER_DIMSE_HOST",
        "MEDINFER_DIMSE_PORT",
        "MEDINFER_DIMSE_AE_TITLE",
        "MEDINFER_DIMSE_ALLOWED_CALLING_AES",
        "MEDINFER_PACS_DESTINATION",
    }
)
#: The first onnxruntime-gpu release on PyPI whose CUDA provider links libcudart.so.13
#: (1.20 to 1.26 link CUDA 12 and cannot use the CUDA 13 base image's libraries).
ORT_CUDA13_FLOOR = Version("1.27")
#: Checkov checks the Dockerfile may skip, each with the reason it is safe. Every
#: ``# checkov:skip=`` comment in the Dockerfile must be listed here, and vice versa.
ALLOWED_CHECKOV_SKIPS: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    base: str
    alias: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_instructions(text: str) -> list[Instruction]:
    """Logical instructions: continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, value = " ".join(parts).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return instructions


def parse_stages(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.value.split() if not w.startswith("--")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], alias=alias, line=instruction.line))
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), value
    assert all(isinstance(v, str) for v in parsed), value
    return parsed


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        tokens = shlex.split(instruction.value)
        if "=" not in tokens[0]:  # legacy `ENV KEY value`
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            key, _, value = token.partition("=")
            env[key] = value
    return env


def labels_of(stage: Stage) -> dict[str, str]:
    labels: dict[str, str] = {}
    for instruction in stage.all("LABEL"):
        for token in shlex.split(instruction.value):
            key, _, value = token.partition("=")
            labels[key] = value
    return labels


_PIP_OPTIONS_WITH_VALUE = {"-r", "-c", "-e", "-i", "--requirement", "--constraint", "--index-url", "--extra-index-url"}


def pip_requirements(run_value: str) -> list[str]:
    """Requirement strings given to every ``pip install`` in one RUN (local paths excluded)."""
    lexer = shlex.shlex(run_value, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    requirements: list[str] = []
    for tokens in commands:
        for index in range(len(tokens) - 1):
            if Path(tokens[index]).name in {"pip", "pip3"} and tokens[index + 1] == "install":
                skip_next = False
                for token in tokens[index + 2 :]:
                    if skip_next:
                        skip_next = False
                    elif token in _PIP_OPTIONS_WITH_VALUE:
                        skip_next = True
                    elif not token.startswith(("-", ".", "/")):
                        requirements.append(token)
    return requirements


def copy_sources(instruction: Instruction) -> list[str]:
    """Build-context sources of a COPY (empty for ``COPY --from=...``)."""
    words = instruction.value.split()
    if any(w.startswith("--from=") for w in words):
        return []
    args = [w for w in words if not w.startswith("--")]
    return args[:-1]


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def stages(dockerfile_text: str) -> list[Stage]:
    return parse_stages(dockerfile_text)


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_is_multi_stage_from_one_cuda_base(stages: list[Stage]) -> None:
    aliases = [s.alias for s in stages]
    assert len(stages) >= 2, "builder and runtime stages expected"
    assert all(aliases), f"every stage needs an AS name: {aliases}"
    assert len(set(aliases)) == len(aliases), f"stage names must be unique: {aliases}"
    assert {"builder", "runtime"} <= set(aliases)
    assert stages[-1].alias == "runtime", "the last stage is what `docker build` produces"
    # One external image; every other stage derives from an earlier stage, so the venv built in
    # `builder` finds the very same /usr/bin/python3 in `runtime`.
    assert "/" in stages[0].base
    seen = {stages[0].alias}
    for stage in stages[1:]:
        assert stage.base in seen, f"stage {stage.alias} starts FROM {stage.base}, not from an earlier stage"
        seen.add(stage.alias)


def test_base_image_is_cuda13_cudnn9_ubuntu2404_pinned(stages: list[Stage], runtime: Stage) -> None:
    base = stages[0].base
    # The CUDA 13 images carry cuDNN 9 under the unversioned `cudnn` flavour.
    match = re.fullmatch(r"nvidia/cuda:(13)\.(\d+)\.(\d+)-cudnn(9)?-runtime-ubuntu24\.04", base)
    assert match, f"expected nvidia/cuda:13.x.y-cudnn-runtime-ubuntu24.04, got {base}"
    assert labels_of(runtime)["org.opencontainers.image.base.name"] == base


def test_venv_is_built_in_builder_and_copied_into_runtime(stages: list[Stage], runtime: Stage) -> None:
    builder = next(s for s in stages if s.alias == "builder")
    runs = " ".join(i.value for i in builder.all("RUN"))
    assert "python3 -m venv /opt/venv" in runs
    assert re.search(r"/opt/venv/bin/pip install \"?\.\[postgres\]\"?", runs), "installs the project with [postgres]"
    copies = [i.value.split() for i in runtime.all("COPY")]
    assert ["--from=builder", "/opt/venv", "/opt/venv"] in copies
    assert env_of(runtime)["PATH"].startswith("/opt/venv/bin:")
    assert "python3-venv" not in " ".join(i.value for i in runtime.all("RUN")), "no build tooling in runtime"


def test_only_onnxruntime_gpu_is_installed(stages: list[Stage], pyproject: dict[str, Any]) -> None:
    image_requirements = [
        Requirement(r) for stage in stages for run in stage.all("RUN") for r in pip_requirements(run.value)
    ]
    project = pyproject["project"]
    project_requirements = [Requirement(r) for r in project["dependencies"]]
    project_requirements += [Requirement(r) for r in project["optional-dependencies"]["postgres"]]
    installed = image_requirements + project_requirements
    names = {r.name.lower().replace("_", "-") for r in installed}
    assert "onnxruntime" not in names, "plain (CPU) onnxruntime would overwrite onnxruntime-gpu"
    gpu = [r for r in installed if r.name.lower().replace("_", "-") == "onnxruntime-gpu"]
    assert gpu, "onnxruntime-gpu is not installed"
    floors = [
        Version(spec.version) for r in gpu for spec in r.specifier if spec.operator in {">=", "==", "~=", ">", "==="}
    ]
    assert floors, "onnxruntime-gpu needs a lower bound"
    assert max(floors) >= ORT_CUDA13_FLOOR, f"onnxruntime-gpu < {ORT_CUDA13_FLOOR} links CUDA 12, not 13"


def test_builder_refuses_cpu_onnxruntime(stages: list[Stage]) -> None:
    builder = next(s for s in stages if s.alias == "builder")
    runs = " ".join(i.value for i in builder.all("RUN"))
    assert "'onnxruntime' not in names" in runs
    assert "CUDAExecutionProvider" in runs


def test_runtime_checks_cuda_libraries_at_build_time(runtime: Stage) -> None:
    runs = " ".join(i.value for i in runtime.all("RUN"))
    assert "libonnxruntime_providers_cuda.so" in runs
    assert "ldd" in runs
    assert "libcudnn" in runs


def test_migrations_ship_in_the_wheel_and_the_build_checks_them(stages: list[Stage]) -> None:
    # `medinfer migrate` imports the `migrations` package, so the wheel must carry it and its ini.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = pyproject["tool"]["setuptools"]
    assert "migrations*" in setuptools["packages"]["find"]["include"]
    assert "alembic.ini" in setuptools["package-data"]["migrations"]
    builder = next(s for s in stages if s.alias == "builder")
    assert any(copy_sources(c) == ["migrations/"] for c in builder.all("COPY"))
    runs = " ".join(i.value for i in builder.all("RUN"))
    assert "files('migrations').joinpath('alembic.ini')" in runs


def test_runtime_runs_as_non_root_numeric_user(runtime: Stage) -> None:
    users = runtime.all("USER")
    assert users, "the runtime stage sets no USER"
    user = users[-1].value
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER should be numeric (uid[:gid]), got {user}"
    uid = int(user.split(":")[0])
    assert uid != 0
    assert uid == RUNTIME_UID
    runs = " ".join(i.value for i in runtime.all("RUN"))
    assert f"--uid {uid}" in runs, "the numeric user is created with useradd"
    assert "sudo" not in runs
    assert runtime.instructions.index(users[-1]) > max(
        runtime.instructions.index(i) for i in runtime.instructions if i.keyword in {"RUN", "COPY"}
    ), "USER comes after every RUN and COPY"


def test_runtime_environment(runtime: Stage) -> None:
    env = env_of(runtime)
    assert env["MEDINFER_HOST"] == "0.0.0.0"  # noqa: S104 - inside the container, published on loopback by compose
    assert env["MEDINFER_PORT"] == str(HTTP_PORT)
    assert env["MEDINFER_DATA_DIR"] == "/var/lib/medinfer"
    assert env["MEDINFER_MODEL_REPOSITORY"] == "/opt/medinfer/models"
    assert env["MEDINFER_ENV"] == "production", "fail closed: production refuses placeholder secrets"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "no .pyc writes on a read-only root"
    assert not any(k in env for k in ("MEDINFER_AUDIT_HMAC_KEY", "MEDINFER_PSEUDONYM_KEY")), "no secrets in the image"


def test_runtime_is_read_only_root_friendly(runtime: Stage) -> None:
    volumes = [v for i in runtime.all("VOLUME") for v in exec_form(i.value)]
    assert set(volumes) == {"/var/lib/medinfer", "/tmp"}  # noqa: S108 - the container's own /tmp
    runs = " ".join(i.value for i in runtime.all("RUN"))
    assert f"install -d -o {RUNTIME_UID} -g {RUNTIME_UID}" in runs, "data dir owned by the runtime user"
    models = [c for c in runtime.all("COPY") if copy_sources(c) == ["models/"]]
    assert len(models) == 1
    assert models[0].value.endswith(" /opt/medinfer/models/")
    workdirs = [i.value for i in runtime.all("WORKDIR")]
    assert workdirs
    assert all(w.startswith("/") for w in workdirs)


def test_ports_and_command(runtime: Stage) -> None:
    exposed = {p.split("/")[0] for i in runtime.all("EXPOSE") for p in i.value.split()}
    assert exposed == {str(HTTP_PORT), str(DICOM_PORT)}
    cmds = runtime.all("CMD")
    assert len(cmds) == 1
    assert exec_form(cmds[0].value) == ["medinfer", "serve"]
    assert not runtime.all("ENTRYPOINT"), "keep the base image's entrypoint; medinfer is the CMD"


def test_healthcheck_probes_livez_with_python(runtime: Stage) -> None:
    checks = runtime.all("HEALTHCHECK")
    assert len(checks) == 1
    options, _, command = checks[0].value.partition("CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    argv = exec_form(command)
    assert argv[:2] == ["python3", "-c"]
    code = argv[2]
    assert "urllib.request" in code
    assert "'http://127.0.0.1:' + port + '/livez'" in code
    assert f"'MEDINFER_PORT', '{HTTP_PORT}'" in code
    ast.parse(code)  # the probe is valid Python
    assert not re.search(r"\b(curl|wget)\b", command)


def test_oci_labels(runtime: Stage, pyproject: dict[str, Any]) -> None:
    labels = labels_of(runtime)
    for key in ("title", "description", "licenses", "version", "revision", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing OCI label {key}"
    assert labels["org.opencontainers.image.title"] == pyproject["project"]["name"]
    assert labels["org.opencontainers.image.licenses"] == pyproject["project"]["license"]


def test_no_add_and_no_latest(stages: list[Stage]) -> None:
    assert not any(s.all("ADD") for s in stages), "COPY, not ADD"
    assert not any(s.base.endswith(":latest") for s in stages)


# ---------------------------------------------------------------------------------------------
# .dockerignore


def _dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore syntax (Go filepath.Match plus ``**``) as a regular expression."""
    out: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.index("]", index)
            out.append("[" + pattern[index + 1 : end].replace("!", "^", 1) + "]")
            index = end + 1
            continue
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out) + r"\Z")


@pytest.fixture(scope="module")
def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        rules.append((negate, _dockerignore_pattern(pattern)))
    return rules


def is_ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether the build context leaves ``path`` out: the last rule matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        ".venv-checkov/bin/checkov",
        ".env",
        "var/medinfer.db",
        "var/keys/key.json",
        "tests/unit/test_config.py",
        "training/data/ATTRIBUTION.md",
        "medinfer.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/nodeids",
        "app/__pycache__/main.cpython-312.pyc",
        "docker-compose.yml",
    ],
)
def test_dockerignore_leaves_out(dockerignore: list[tuple[bool, re.Pattern[str]]], path: str) -> None:
    assert is_ignored(dockerignore, path)


def test_every_copied_path_exists_and_reaches_the_build(
    stages: list[Stage], dockerignore: list[tuple[bool, re.Pattern[str]]]
) -> None:
    sources = [src for s in stages for c in s.all("COPY") for src in copy_sources(c)]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files = [f for f in files if "__pycache__" not in f.parts]
        assert files, f"COPY {source}: nothing to copy"
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            assert not is_ignored(dockerignore, relative), f"{relative} is copied but .dockerignore leaves it out"


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


_INTERPOLATION = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|(?P<escaped>\$))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.DOTALL)


def interpolate(value: str) -> str:
    """Resolve ``${VAR:-default}`` as compose would with an empty environment."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        braced = _BRACED.fullmatch(match["braced"] or "")
        assert braced, f"malformed interpolation {match[0]!r}"
        assert braced["op"] in {":-", "-"}, f"{match[0]} has no default: `docker compose up` needs it set"
        return braced["arg"]

    return _INTERPOLATION.sub(substitute, value)


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    data = yaml.safe_load(compose_text)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def published_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host_ip, container_port) for every published port, short or long syntax."""
    result: list[tuple[str, int]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result.append((str(port.get("host_ip", "")), int(port["target"])))
            continue
        fields = str(port).split("/")[0].rsplit(":", 2)
        host_ip = fields[0] if len(fields) == 3 else ""
        result.append((host_ip, int(fields[-1])))
    return result


def test_compose_spec_format(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no `version:` key"
    assert compose.get("name") == "medinfer"
    assert set(compose["services"]) == SERVICES


def test_compose_interpolations_are_well_formed_with_defaults(compose_text: str, compose: dict[str, Any]) -> None:
    matches = list(_INTERPOLATION.finditer(compose_text))
    assert matches
    for match in matches:
        interpolate(match[0])  # asserts the form and a default
    assert "$" not in _INTERPOLATION.sub("", compose_text), "a literal `$` must be written `$$`"
    assert "${" not in interpolate(json.dumps(compose))


def test_third_party_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: image {image} has no tag"
        assert tag != "latest", f"{name}: image {image} uses latest"
        assert re.match(r"v?\d+\.\d+(\.\d+)?", tag), f"{name}: pin {image} to a version"
    assert services["postgres"]["image"].split(":")[1].startswith("16.")


def test_medinfer_and_migrate_share_one_built_image(services: dict[str, dict[str, Any]]) -> None:
    medinfer, migrate = services["medinfer"], services["migrate"]
    assert medinfer["image"] == migrate["image"]
    for service in (medinfer, migrate):
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}


def test_migrate_runs_migrations_once(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["medinfer", "migrate"]
    assert migrate["restart"] == "no", "restart must be the string 'no' (a bare no is a YAML boolean)"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("healthcheck", {}).get("disable") is True, "a one-shot job has nothing to probe"


def test_medinfer_waits_for_postgres_and_migrations(services: dict[str, dict[str, Any]]) -> None:
    depends = services["medinfer"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert "command" not in services["medinfer"], "the image CMD (medinfer serve) runs; it never migrates"


@pytest.mark.parametrize("name", ["medinfer", "postgres", "prometheus", "grafana"])
def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name]["healthcheck"]
    assert not check.get("disable")
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    for key in ("interval", "timeout", "retries"):
        assert key in check


def test_healthcheck_commands(services: dict[str, dict[str, Any]]) -> None:
    medinfer = services["medinfer"]["healthcheck"]["test"]
    assert medinfer[1:3] == ["python3", "-c"]
    assert f"http://127.0.0.1:{HTTP_PORT}/livez" in medinfer[3]
    ast.parse(medinfer[3])
    postgres = services["postgres"]["healthcheck"]["test"]
    assert postgres[1] == "pg_isready"
    assert "--username=medinfer" in postgres


def test_published_ports_are_on_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for host_ip, _ in published_ports(service):
            assert host_ip in {"127.0.0.1", "[::1]", "::1"}, f"{name} publishes a port on all interfaces"
    assert published_ports(services["postgres"]) == [], "the database is reachable only inside the project"
    assert (("127.0.0.1", HTTP_PORT)) in published_ports(services["medinfer"])


@pytest.mark.parametrize("name", ["medinfer", "migrate"])
def test_medinfer_containers_are_hardened(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    assert service["read_only"] is True
    assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"])  # noqa: S108 - container path
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert "user" not in service, "the image's numeric USER applies"
    assert "privileged" not in service


def test_medinfer_keeps_state_in_a_named_volume(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    targets = {v.split(":")[1]: v.split(":")[0] for v in services["medinfer"]["volumes"]}
    assert targets["/var/lib/medinfer"] in compose["volumes"]
    assert services["medinfer"]["init"] is True


def test_database_url_matches_postgres_service(services: dict[str, dict[str, Any]]) -> None:
    raw_env = services["medinfer"]["environment"]
    migrate_env = services["migrate"]["environment"]
    # migrate shares every setting with serve but its login (the owner's) and the service role it
    # grants; serve adds only its DICOM node's and its audit checkpoint directory.
    logins = {"MEDINFER_DATABASE_URL", "MEDINFER_DATABASE_SERVICE_ROLE"}
    shared = {k: v for k, v in migrate_env.items() if k not in logins}
    assert {k: raw_env.get(k) for k in shared} == shared, "migrate and serve use the same settings"
    assert {k for k in raw_env if k not in migrate_env} == DIMSE_SETTINGS | {"MEDINFER_AUDIT_CHECKPOINT_DIR"}
    postgres_env = services["postgres"]["environment"]
    pattern = r"postgresql\+psycopg://(?P<user>[^:]+):(?P<password>[^@]+)@(?P<host>[^:/]+):(?P<port>\d+)/(?P<db>\w+)"
    owner = re.fullmatch(pattern, interpolate(migrate_env["MEDINFER_DATABASE_URL"]))
    service = re.fullmatch(pattern, interpolate(raw_env["MEDINFER_DATABASE_URL"]))
    assert owner, migrate_env["MEDINFER_DATABASE_URL"]
    assert service, raw_env["MEDINFER_DATABASE_URL"]
    for url in (owner, service):
        assert url["host"] == "postgres"
        assert url["port"] == "5432"
        assert url["db"] == postgres_env["POSTGRES_DB"]
    # migrate logs in as the owner of the tables, the service as a role that owns nothing.
    assert owner["user"] == postgres_env["POSTGRES_USER"]
    assert owner["password"] == interpolate(postgres_env["POSTGRES_PASSWORD"])
    assert "${POSTGRES_PASSWORD" in migrate_env["MEDINFER_DATABASE_URL"]
    assert service["user"] == migrate_env["MEDINFER_DATABASE_SERVICE_ROLE"] != owner["user"]
    assert service["password"] == interpolate(postgres_env["MEDINFER_APP_DB_PASSWORD"])
    assert "${MEDINFER_APP_DB_PASSWORD" in raw_env["MEDINFER_DATABASE_URL"]
    init = (COMPOSE_DIR / "postgres-init" / "10-service-role.sh").read_text(encoding="utf-8")
    assert f"CREATE ROLE {service['user']} LOGIN NOSUPERUSER" in init
    assert "./deploy/compose/postgres-init:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]


def _placeholder_secret() -> str:
    """``PLACEHOLDER_SECRET`` from app/config.py, read without importing the application."""
    tree = ast.parse((REPO / "app" / "config.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "PLACEHOLDER_SECRET" for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    pytest.fail("app/config.py no longer defines PLACEHOLDER_SECRET")


def test_secrets_come_from_the_environment(services: dict[str, dict[str, Any]]) -> None:
    secretish = re.compile(r"PASSWORD|SECRET|_KEY$|TOKEN|REGISTERED_USERS|DATABASE_URL")
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key):
                assert "${" in str(value), f"{name}.{key} is a literal secret; take it from the environment"
                assert "dev" in interpolate(str(value)), f"{name}.{key}: a default must say it is dev-only"
    medinfer_env = services["medinfer"]["environment"]
    placeholder = _placeholder_secret()
    # The defaults are the app's own placeholder, which MEDINFER_ENV=production refuses.
    assert interpolate(medinfer_env["MEDINFER_AUDIT_HMAC_KEY"]) == placeholder
    assert interpolate(medinfer_env["MEDINFER_PSEUDONYM_KEY"]) == placeholder
    assert interpolate(medinfer_env["MEDINFER_ENV"]) == "dev"


def test_volumes_and_config_mounts(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount {source} does not exist"
                assert mode == ["ro"], f"{name}: mount {source} read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
            assert target.startswith("/")
    assert used == declared, f"declared but unused volumes: {declared - used}"


# ---------------------------------------------------------------------------------------------
# deploy/compose: the configuration the compose services mount


def test_prometheus_scrapes_medinfer(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    medinfer = jobs["medinfer"]
    assert medinfer.get("metrics_path", "/metrics") == "/metrics"
    assert medinfer.get("scheme", "http") == "http"
    targets = [t for group in medinfer["static_configs"] for t in group["targets"]]
    assert targets == [f"medinfer:{HTTP_PORT}"]
    mount = "./deploy/compose/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_grafana_provisions_the_prometheus_datasource(services: dict[str, dict[str, Any]]) -> None:
    files = sorted(GRAFANA_DATASOURCES.glob("*.yml"))
    assert files
    datasources = [ds for f in files for ds in yaml.safe_load(f.read_text(encoding="utf-8"))["datasources"]]
    prometheus = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert len(prometheus) == 1
    assert prometheus[0]["url"] == "http://prometheus:9090"
    assert prometheus[0]["access"] == "proxy"
    assert "./deploy/compose/grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    assert interpolate(services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"]) == "false"


def _dimse_destination(url: str) -> tuple[str, str, int]:
    """(called AE, host, port) of ``dimse://CALLED_AE@host:port``, the form app/config.py takes."""
    match = re.fullmatch(r"dimse://(?P<ae>[^@]{1,16})@(?P<host>[\w.-]+):(?P<port>\d+)", url)
    assert match, f"not a dimse://CALLED_AE@host:port destination: {url}"
    return match["ae"], match["host"], int(match["port"])


def test_medinfer_runs_the_dicom_scp_for_the_compose_orthanc(services: dict[str, dict[str, Any]]) -> None:
    env = {k: interpolate(str(v)) for k, v in services["medinfer"]["environment"].items()}
    orthanc = json.loads(ORTHANC_CONFIG.read_text(encoding="utf-8"))
    modality = orthanc["DicomModalities"]["medinfer"]
    assert env["MEDINFER_DIMSE_ENABLED"] == "true"
    assert env["MEDINFER_DIMSE_HOST"] == "0.0.0.0", "inside the container; the port stays unpublished"  # noqa: S104
    assert int(env["MEDINFER_DIMSE_PORT"]) == DICOM_PORT == modality["Port"]
    assert env["MEDINFER_DIMSE_AE_TITLE"] == modality["AET"]
    # Only Orthanc may associate: Orthanc's SendToModality calls with its own AE title.
    assert json.loads(env["MEDINFER_DIMSE_ALLOWED_CALLING_AES"]) == [orthanc["DicomAet"]]
    # Results go back to the compose Orthanc, by C-STORE, to the AE title it checks.
    called_ae, host, port = _dimse_destination(env["MEDINFER_PACS_DESTINATION"])
    assert (called_ae, host, port) == (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])
    assert orthanc["DicomCheckCalledAet"] is True
    assert orthanc["DicomAlwaysAllowStore"] is True, "Orthanc accepts medinfer's SR without registering it"
    # Reachable inside the project only: exposed, never published on the host.
    assert str(DICOM_PORT) in services["medinfer"]["expose"]
    assert DICOM_PORT not in {port for _, port in published_ports(services["medinfer"])}


def test_orthanc_routes_every_stored_image_to_medinfer(services: dict[str, dict[str, Any]]) -> None:
    config = json.loads(ORTHANC_CONFIG.read_text(encoding="utf-8"))
    mounts = {
        source: target
        for source, target, *mode in (v.split(":") for v in services["orthanc"]["volumes"])
        if mode == ["ro"]
    }
    target = mounts.get(f"./{ORTHANC_ROUTE.relative_to(REPO).as_posix()}")
    assert target, f"compose's Orthanc does not mount {ORTHANC_ROUTE.name} read-only"
    assert config["LuaScripts"] == [target], "Orthanc must load the mounted route script"
    script = ORTHANC_ROUTE.read_text(encoding="utf-8")
    code = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    assert re.search(r"^function OnStoredInstance\(instanceId, tags, metadata, origin\)$", code, re.MULTILINE)
    modalities = re.findall(r"pcall\(SendToModality, instanceId, \"(\w+)\"\)", code)
    assert modalities == ["medinfer"]
    assert modalities[0] in config["DicomModalities"]
    # Never route medinfer's own results (SR) or what a Lua script stored: no loops.
    assert 'tags["Modality"] ~= "SR"' in code
    assert 'origin["RequestOrigin"] ~= "Lua"' in code
    # The end-to-end test (tests/integration/test_imaging_pacs.py) runs Orthanc with this very file.
    test_services = TEST_SERVICES.read_text(encoding="utf-8")
    assert f'cp "$repo/{ORTHANC_ROUTE.relative_to(REPO).as_posix()}" "$root/orthanc/route.lua"' in test_services
    assert '"LuaScripts": ["$root/orthanc/route.lua"]' in test_services
    assert "OnStoredInstance" not in test_services, "no second, untested copy of the routing script"


def test_orthanc_configuration(services: dict[str, dict[str, Any]]) -> None:
    config = json.loads(ORTHANC_CONFIG.read_text(encoding="utf-8"))
    assert config["AuthenticationEnabled"] is True
    assert "RegisteredUsers" not in config, "credentials come from ORTHANC__REGISTERED_USERS, not a committed file"
    modality = config["DicomModalities"]["medinfer"]
    assert modality["Host"] == "medinfer"
    assert modality["Port"] == DICOM_PORT
    assert str(DICOM_PORT) in services["medinfer"]["expose"]
    container_ports = {port for _, port in published_ports(services["orthanc"])}
    assert container_ports == {config["DicomPort"], config["HttpPort"]}
    assert "./deploy/compose/orthanc.json:/etc/orthanc/orthanc.json:ro" in services["orthanc"]["volumes"]


def test_gpu_override_reserves_an_nvidia_gpu_for_medinfer_only() -> None:
    override = yaml.safe_load(GPU_OVERRIDE.read_text(encoding="utf-8"))
    assert set(override) == {"services"}
    assert set(override["services"]) == {"medinfer"}
    devices = override["services"]["medinfer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


# ---------------------------------------------------------------------------------------------
# checkov


@pytest.fixture(scope="module")
def checkov() -> Path:
    return checkov_path()


def _failures(reports: list[dict[str, Any]]) -> list[str]:
    return [
        f"{c['check_id']} {c['check_name']} ({c['file_abs_path']}:{c['file_line_range']})"
        for r in reports
        for c in r["results"].get("failed_checks", [])
    ]


def test_checkov_dockerfile(checkov: Path, dockerfile_text: str) -> None:
    reports = run_checkov("--framework", "dockerfile", "-f", str(DOCKERFILE), quiet=True)
    assert len(reports) == 1
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 0, "checkov evaluated nothing"
    assert _failures(reports) == []
    assert summary["failed"] == 0
    skips = dict(re.findall(r"#\s*checkov:skip=(CKV2?_[A-Z0-9_]+):(.*)", dockerfile_text))
    assert set(skips) == set(ALLOWED_CHECKOV_SKIPS), "list every checkov skip (with its reason) in this test"
    assert all(reason.strip() for reason in skips.values()), "every checkov skip needs a reason"
    assert summary["skipped"] == len(skips)


def test_checkov_finds_no_secrets_in_container_files(checkov: Path, tmp_path: Path) -> None:
    # Checkov has no docker-compose framework; its secrets scan covers the compose files. A
    # canary with a high-entropy value, made here and never committed, proves the scan runs.
    canary = tmp_path / "canary.yml"
    value = hashlib.sha256(b"medinfer-checkov-canary").hexdigest()
    canary.write_text(f'services:\n  app:\n    environment:\n      DB_PASSWORD: "{value}"\n', encoding="utf-8")
    scanned = [COMPOSE, GPU_OVERRIDE, PROMETHEUS_CONFIG, ORTHANC_CONFIG, ORTHANC_ROUTE, DOCKERFILE, DOCKERIGNORE]
    scanned += sorted(GRAFANA_DATASOURCES.glob("*.yml"))
    args = ["--framework", "secrets"]
    for path in [*scanned, canary]:
        args += ["-f", str(path)]
    reports = run_checkov(*args, quiet=True)
    flagged = {Path(c["file_abs_path"]).resolve() for r in reports for c in r["results"].get("failed_checks", [])}
    assert canary.resolve() in flagged, "checkov's secrets scan did not flag the canary: it is not scanning"
    assert flagged == {canary.resolve()}, _failures(reports)


# -- the production gate, as shipped -------------------------------------------------------------

STRONG_SECRETS = {
    "MEDINFER_AUDIT_HMAC_KEY": "a-real-audit-hmac-key-of-forty-characters",
    "MEDINFER_PSEUDONYM_KEY": "a-real-pseudonym-key-of-forty-characters!",
    "MEDINFER_KEY_ENCRYPTION_KEY": "a-real-key-encryption-key-forty-chars-!!",
}


def _served_and_routed(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str], bool]:
    """What the service would serve and route with ``env`` and the shipped models: (served
    name@version, routed model names, whether production withholds results from the PACS)."""
    from app.config import Settings
    from app.container import clinical_use_policy
    from app.imaging.routing import parse_routes
    from app.inference.spec import iter_model_dirs, load_spec

    for name in [k for k in os.environ if k.startswith("MEDINFER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    policy = clinical_use_policy(settings)
    specs = [load_spec(d) for d in iter_model_dirs(REPO / "models")]
    assert specs, "the image ships the reference models"
    served = [f"{s.name}@{v}" for s in specs for v in s.served_versions() if not policy.refuses(s, v)]
    routes = parse_routes(settings.imaging_routes) if settings.imaging_routes else ()
    withholds = all(policy.withholds_results(s) for s in specs if s.not_for_clinical_use)
    return served, [r.model for r in routes], withholds and settings.env == "production"


def test_the_image_as_shipped_serves_no_demonstration_model_and_routes_nothing(
    runtime: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(runtime)
    assert env["MEDINFER_ENV"] == "production"
    assert json.loads(env["MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS"]) == []
    assert "MEDINFER_IMAGING_ROUTES" not in env, "routing is the site's choice"
    image_env = {k: v for k, v in env.items() if k.startswith("MEDINFER_")} | STRONG_SECRETS
    served, routed, withholds = _served_and_routed(image_env, monkeypatch)
    assert served == [], "every shipped model is not_for_clinical_use: production serves none unacknowledged"
    assert routed == []
    assert withholds


def test_compose_round_trip_runs_only_outside_production(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As shipped, compose is a dev stack whose round trip routes chest CR/DX to the demonstration
    CXR model. Started with MEDINFER_ENV=production, it serves no demonstration model, so its
    route finds the model refused and no SR reaches Orthanc."""
    raw = services["medinfer"]["environment"]
    env = {k: interpolate(str(v)) for k, v in raw.items()}
    assert env["MEDINFER_ENV"] == "dev"
    assert json.loads(env["MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS"]) == []
    dev_served, routed, _ = _served_and_routed(env, monkeypatch)
    assert routed == ["cxr-pneumonia"]
    assert any(s.startswith("cxr-pneumonia@") for s in dev_served)

    production = env | {"MEDINFER_ENV": "production"} | STRONG_SECRETS
    served, routed, withholds = _served_and_routed(production, monkeypatch)
    assert served == []
    assert routed == ["cxr-pneumonia"]  # the rule stays, and finds its model refused
    assert withholds
