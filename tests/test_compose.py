"""deploy/compose.yaml, read as Docker Compose would read it (Docker cannot run here): every image
pinned, every container non-root, every command, module, setting, port and volume it names exists
in the project and agrees with the rest, and its dependencies give the start order deploy/README.md
describes. The scripts it runs are run here against stand-ins (encode-worker.sh) or the real server
(postgres-init.sh)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from graphlib import TopologicalSorter
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from hashlake.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROM = ROOT / "dashboards" / "prometheus"

# Settings the lake (catalog on PostgreSQL, read-only query credentials) and retraining (Ray) add;
# compose passes them, so each must be a field of hashlake.config.Settings.
ADDED_BY_THE_LAKE = ("pg_host", "pg_port", "pg_database", "pg_user", "pg_password", "query_pg_user",
                     "query_pg_password", "query_s3_access_key", "query_s3_secret_key")
ADDED_BY_RETRAINING = ("ray_address",)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")

# compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z0-9_]+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


class UnsetVariable(KeyError):
    pass


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def filled_env(**overrides: str) -> dict[str, str]:
    """.env.example with every blank secret filled in, as an operator's deploy/.env would be."""
    env = {name: value or f"{name.lower()}-value" for name, value in env_example().items()}
    env.update(overrides)
    return env


def interpolate(node, env: dict[str, str]):
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name, "")
        if op == ":?" and not value:
            raise UnsetVariable(f"{name}: {arg}")
        return value or (arg if op == ":-" else "")

    return VARIABLE.sub(substitute, node)


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the anchors and `<<` merges


def compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(raw_compose(), filled_env() if env is None else env)


SERVICES = compose()["services"]


def test_the_compose_file_follows_the_compose_specification():
    """Validated by compose_spec (a full Compose specification parser), as `docker compose config`
    would: unknown keys, wrong types, conditions and units are refused. Interpolated as text first,
    as Compose does, then anchors and merges resolved by PyYAML (compose_spec does not merge)."""
    import json

    from compose_spec import PyCompose

    def validate(text: str) -> None:
        model = yaml.safe_load(interpolate(text, filled_env()))
        PyCompose.from_json(json.dumps({k: v for k, v in model.items() if not k.startswith("x-")}))

    validate(COMPOSE.read_text())
    validate((DEPLOY / "compose.ports.yaml").read_text())
    with pytest.raises(ValueError, match="intervall"):  # the check does refuse what Compose refuses
        validate(COMPOSE.read_text().replace("interval: 5s", "intervall: 5s", 1))
HASHLAKE_IMAGE = {name for name, svc in SERVICES.items() if "build" in svc}


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


# --- the Dockerfile ------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name → its instructions (keyword, rest), a stage built FROM another inheriting its own."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.I)
            base, name = match[1], match[2]
            current = list(stages.get(base, [])) + [("FROM", base)]
            stages[name or base] = current
        else:
            current.append((keyword.upper(), rest.strip()))
    return stages


def last(instructions: list[tuple[str, str]], keyword: str) -> str | None:
    values = [rest for kw, rest in instructions if kw == keyword]
    return values[-1] if values else None


def image_entrypoint(service: str) -> list[str]:
    svc = SERVICES[service]
    if "entrypoint" in svc:
        entry = svc["entrypoint"]
        return shlex.split(entry) if isinstance(entry, str) else list(entry)
    if "build" in svc:
        entry = last(dockerfile_stages()[svc["build"]["target"]], "ENTRYPOINT")
        return yaml.safe_load(entry) if entry else []
    return []


def argv(service: str) -> list[str]:
    command = SERVICES[service].get("command", [])
    return image_entrypoint(service) + (shlex.split(command) if isinstance(command, str) else list(command))


def test_every_image_is_pinned_to_a_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, svc in SERVICES.items():
        image = svc.get("image")
        assert image, f"{name}: no image"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: image {image} is not pinned to a version"
        if "build" in svc:  # the project's own images carry the project's version by default
            assert tag == version, f"{name}: image {image}, project version {version}"
            assert svc["build"]["target"] in dockerfile_stages(), f"{name}: no Dockerfile stage {svc['build']}"
    for _, base in [i for stage in dockerfile_stages().values() for i in stage if i[0] == "FROM"]:
        if base not in dockerfile_stages() or ":" in base:
            assert re.search(r":.*\d", base) and not base.endswith(":latest"), f"Dockerfile base {base} unpinned"


def test_every_container_runs_as_a_non_root_user():
    stages = dockerfile_stages()
    for name, svc in SERVICES.items():
        if "user" in svc:
            uid = str(svc["user"]).split(":")[0]
            assert uid not in ("0", "root", ""), f"{name} runs as {svc['user']}"
        else:
            assert "build" in svc, f"{name}: a third-party image without `user:` runs as its image's default"
            user = last(stages[svc["build"]["target"]], "USER")
            assert user and user.split(":")[0] not in ("0", "root"), f"{name}: image's last USER is {user}"


def test_only_the_intake_and_minio_are_published():
    published = {name for name, svc in SERVICES.items() if svc.get("ports")}
    assert published == {"intake", "minio"}
    assert SERVICES["intake"]["ports"] == [f"{environment(SERVICES['intake'])['HASHLAKE_WEBHOOK_PORT']}:8080"]
    minio = SERVICES["minio"]
    assert "9000:9000" in minio["ports"]
    console = re.search(r"--console-address :(\d+)", minio["command"])[1]
    assert f"127.0.0.1:{console}:{console}" in minio["ports"], "MinIO's console is published beyond loopback"
    extra = yaml.safe_load((DEPLOY / "compose.ports.yaml").read_text())["services"]
    for name, svc in extra.items():
        assert name in SERVICES
        assert all(port.startswith("127.0.0.1:") for port in svc["ports"]), f"{name}: {svc['ports']}"


def test_every_hashlake_variable_is_a_setting():
    fields = Settings.model_fields
    missing = [f for f in (*ADDED_BY_THE_LAKE, *ADDED_BY_RETRAINING) if f not in fields]
    assert not missing, f"hashlake.config.Settings lacks the lake/retraining settings compose passes: {missing}"
    for name, svc in SERVICES.items():
        for variable in environment(svc):
            if variable.startswith("HASHLAKE_") and variable[len("HASHLAKE_"):].lower() not in fields:
                # a process's own variable outside the settings (the worker node's metrics port ...)
                assert read_from_the_environment(variable), f"{name}: {variable} is no setting and no code reads it"


def read_from_the_environment(variable: str) -> bool:
    """Whether project code names ``variable`` as a string literal (os.environ[...] and the like)."""
    return any(f'"{variable}"' in path.read_text() for package in ("hashlake", "workers", "scheduler")
               for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("service", sorted(HASHLAKE_IMAGE))
def test_each_hashlake_service_environment_loads_as_settings(service, monkeypatch):
    for variable in [v for v in os.environ if v.startswith("HASHLAKE_")]:
        monkeypatch.delenv(variable)
    env = environment(SERVICES[service])
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    settings = Settings()  # validates every value (ports are ints, the endpoint has a scheme ...)
    assert {f for f in (*ADDED_BY_THE_LAKE, *ADDED_BY_RETRAINING)} <= {
        v[len("HASHLAKE_"):].lower() for v in env}, f"{service} lacks lake or retraining settings"
    assert settings.pg_host == "postgres" and settings.ray_address == "http://ray-head:8265"
    assert settings.s3_endpoint == "http://minio:9000"


# --- commands ------------------------------------------------------------------------------------
def test_the_command_check_refuses_what_the_cli_lacks():
    assert cli_command_exists(["model", "init"]) and cli_command_exists(["intake"])
    assert not cli_command_exists(["model"])  # a group, not a command
    assert not cli_command_exists(["model", "nope"]) and not cli_command_exists(["nope"])


def cli_command_exists(args: list[str]) -> bool:
    """`hashlake <args>` names a command of the typer app (not a group, not an unknown name)."""
    import typer.main

    from hashlake.cli import app

    command = typer.main.get_command(app)
    for arg in args:
        if not hasattr(command, "commands") or arg.startswith("-"):
            break  # a group has sub-commands; the rest are a command's options and arguments
        if arg not in command.commands:
            return False
        command = command.commands[arg]
    # a group that runs when named alone (`hashlake intake`) is a command too
    return not hasattr(command, "commands") or bool(getattr(command, "invoke_without_command", False))


def check_celery(args: list[str]) -> None:
    import importlib

    from celery import Celery

    module = args[args.index("-A") + 1]
    app = importlib.import_module(module).app
    assert isinstance(app, Celery), f"{module}.app is not a Celery app"
    assert args[args.index("-A") + 2] in ("worker", "beat"), args


def check_command(args: list[str], where: str) -> None:
    """What each program our images run must find in the project."""
    program = os.path.basename(args[0])
    if program == "hashlake":
        assert cli_command_exists(args[1:]), f"{where}: `{shlex.join(args)}` is not a hashlake command"
    elif program == "celery":
        check_celery(args)
    elif program == "hashlake-encode-worker":
        copied = [rest for kw, rest in dockerfile_stages()["worker"] if kw == "COPY" and rest.endswith(program)]
        assert copied, f"{where}: the image does not install {program}"
        script = ROOT / [word for word in copied[0].split() if not word.startswith("--")][0]
        for line in script.read_text().splitlines():
            if re.match(r"\s*exec celery ", line):
                check_celery(shlex.split(line.replace('"$1@%h"', "node@%h"))[1:])
    elif program == "ray":
        sys.path.insert(0, str(DEPLOY))
        try:
            from image_requirements import requirement_name, requirements
        finally:
            sys.path.remove(str(DEPLOY))
        pins = [r for r in requirements(ROOT / "pyproject.toml", "ray") if requirement_name(r) == "ray"]
        assert pins and all("==" in r for r in pins), f"{where}: the ray image installs no pinned ray ({pins})"
        assert args[1] in ("start", "status")  # a node, or its healthcheck
    elif program in ("sh", "bash") and args[1:2] == ["-c"]:
        for simple in re.split(r"\|\||&&|[|;]", args[2]):
            words = [w for w in shlex.split(simple) if w not in ("{", "}")]
            if words:
                check_command(words, where)
    elif program == "python" and args[1:2] == ["-c"]:
        compile(args[2], where, "exec")
    elif program == "grep":
        pass
    else:
        raise AssertionError(f"{where}: runs {args[0]}, which this test does not know how to check")


@pytest.mark.parametrize("service", sorted(HASHLAKE_IMAGE))
def test_each_command_of_the_hashlake_images_exists_in_the_project(service):
    check_command(argv(service), service)
    health = SERVICES[service].get("healthcheck", {}).get("test")
    if health:
        check_command(health[1:], f"{service} healthcheck")


def test_the_intake_healthcheck_asks_a_route_the_webhook_serves():
    from workers.intake.webhook import create_webhook_app

    code = SERVICES["intake"]["healthcheck"]["test"][-1]
    url = urlparse(re.search(r"'(http://[^']+)'", code)[1])
    assert url.port == int(environment(SERVICES["intake"])["HASHLAKE_WEBHOOK_PORT"])
    app = create_webhook_app(Settings(webhook_token="a-token-of-sixteen-plus"), client=None, keys=None)
    assert url.path in {route.path for route in app.routes}


def test_the_init_scripts_are_mounted_from_the_repository_and_parse():
    for service, script in (("minio-init", "/minio-init.sh"), ("postgres", "/docker-entrypoint-initdb.d/hashlake.sh")):
        mounts = dict(reversed(v.rsplit(":", 2)[:2]) for v in SERVICES[service]["volumes"] if v.startswith("./"))
        source = DEPLOY / mounts[script]
        assert source.is_file(), f"{service} mounts {source}, which does not exist"
        subprocess.run(["sh", "-n", str(source)], check=True)
    assert argv("minio-init") == ["/bin/sh", "/minio-init.sh"]
    text = (DEPLOY / "minio-init.sh").read_text()
    # events go to the webhook target the minio service configures, with its token and queue_dir
    target = re.search(r"arn:minio:sqs::(\w+):webhook", text)[1]
    minio_env = environment(SERVICES["minio"])
    assert minio_env[f"MINIO_NOTIFY_WEBHOOK_ENABLE_{target}"] == "on"
    assert minio_env[f"MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_{target}"] == environment(SERVICES["intake"])["HASHLAKE_WEBHOOK_TOKEN"]
    assert f"MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_{target}" in minio_env
    assert re.search(r"mc event add --ignore-existing --event put,delete \"local/\$HASHLAKE_IMAGES_BUCKET\"", text)
    assert "mc mb --ignore-existing" in text
    # the buckets and the query key it creates are the ones the services use
    init_env, service_env = environment(SERVICES["minio-init"]), environment(SERVICES["intake"])
    for variable in ("HASHLAKE_IMAGES_BUCKET", "HASHLAKE_INDEX_BUCKET", "HASHLAKE_QUERY_S3_ACCESS_KEY",
                     "HASHLAKE_QUERY_S3_SECRET_KEY"):
        assert init_env[variable] == service_env[variable], variable
        assert f"${variable}" in text, f"minio-init.sh does not use {variable}"


def test_redis_refuses_writes_rather_than_evicting_queued_work():
    command = SERVICES["redis"]["command"]
    assert "--maxmemory-policy noeviction" in command and re.search(r"--maxmemory \d+\w*b", command)


# --- addresses, ports, volumes -------------------------------------------------------------------
def listening_port(service: str) -> dict[str, int]:
    """What each service listens on inside the network, from its own configuration."""
    env = environment(SERVICES.get(service, {}))
    return {"minio": 9000, "redis": 6379, "postgres": 5432, "prometheus": 9090,
            "ray-head": int(re.search(r"--dashboard-port=(\d+)", " ".join(argv("ray-head")))[1]),
            "intake": int(env.get("HASHLAKE_WEBHOOK_PORT", 0))}


def test_every_address_points_at_a_service_and_the_port_it_listens_on():
    from workers.intake.webhook import WEBHOOK_PATH

    ports = listening_port("intake")
    for name in HASHLAKE_IMAGE:
        env = environment(SERVICES[name])
        for variable in ("HASHLAKE_S3_ENDPOINT", "HASHLAKE_REDIS_URL", "HASHLAKE_RAY_ADDRESS"):
            url = urlparse(env[variable])
            assert url.hostname in SERVICES and url.port == ports[url.hostname], f"{name}: {variable}={env[variable]}"
        assert env["HASHLAKE_PG_HOST"] in SERVICES and int(env["HASHLAKE_PG_PORT"]) == ports["postgres"]
    webhook = urlparse(environment(SERVICES["minio"])["MINIO_NOTIFY_WEBHOOK_ENDPOINT_HASHLAKE"])
    assert (webhook.hostname, webhook.port, webhook.path) == ("intake", ports["intake"], WEBHOOK_PATH)
    datasource = yaml.safe_load((ROOT / "dashboards/grafana/provisioning/datasources/prometheus.yml").read_text())
    url = urlparse(datasource["datasources"][0]["url"])
    assert url.hostname in SERVICES and url.port == ports[url.hostname]


def test_prometheus_scrapes_each_exporter_where_it_listens():
    jobs = {j["job_name"]: j for j in yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]}
    intake = jobs["hashlake-intake"]["static_configs"][0]["targets"]
    assert intake == [f"intake:{environment(SERVICES['intake'])['HASHLAKE_METRICS_PORT']}"]
    worker = jobs["hashlake-worker"]["dns_sd_configs"][0]
    assert worker["names"] == ["worker"]
    assert worker["port"] == int(environment(SERVICES["worker"])["HASHLAKE_WORKER_METRICS_PORT"])
    ray = jobs["hashlake-ray"]["dns_sd_configs"][0]
    assert set(ray["names"]) == {"ray-head", "ray-worker"}
    for node in ray["names"]:
        assert f"--metrics-export-port={ray['port']}" in argv(node)


def mounts(service: str) -> list[tuple[str, str]]:
    """(source, target) of each volume of ``service``."""
    pairs = []
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        pairs.append((source, target))
    return pairs


def test_volumes_are_declared_and_mounted_where_they_are_read():
    declared = set(raw_compose()["volumes"])
    named = {source for name in SERVICES for source, _ in mounts(name) if not source.startswith((".", "/"))}
    assert named == declared, f"used {sorted(named)}, declared {sorted(declared)}"
    raw = raw_compose()["services"]
    for name in SERVICES:
        for (source, _), raw_volume in zip(mounts(name), raw[name].get("volumes", [])):
            if source.startswith(".") and "${" not in raw_volume.split(":")[0]:
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in the repository"
    # Prometheus reads its config and rules where they are mounted
    prometheus = dict((t, s) for s, t in mounts("prometheus"))
    config = re.search(r"--config\.file=(\S+)", " ".join(SERVICES["prometheus"]["command"]))[1]
    assert (DEPLOY / prometheus[config]).resolve() == PROM / "prometheus.yml"
    for rule_file in yaml.safe_load((PROM / "prometheus.yml").read_text())["rule_files"]:
        assert (DEPLOY / prometheus[rule_file]).resolve() == PROM / "alerts.yml"
    # Grafana: provisioning, and the dashboards folder its provider names
    grafana = dict((t, s) for s, t in mounts("grafana"))
    provider = yaml.safe_load((ROOT / "dashboards/grafana/provisioning/dashboards/hashlake.yml").read_text())
    assert (DEPLOY / grafana[provider["providers"][0]["options"]["path"]]).resolve() == ROOT / "dashboards/grafana/dashboards"
    assert (DEPLOY / grafana["/etc/grafana/provisioning"]).resolve() == ROOT / "dashboards/grafana/provisioning"
    # PostgreSQL's data folder lies inside its volume; the GPU claims where the script takes them
    pgdata = environment(SERVICES["postgres"])["PGDATA"]
    assert any(pgdata.startswith(t + "/") for s, t in mounts("postgres") if s in declared)
    claims = re.search(r"GPU_CLAIMS_DIR:-([^}]+)\}", (DEPLOY / "encode-worker.sh").read_text())[1]
    assert ("gpu-claims", claims) in mounts("worker")
    assert re.search(rf"install -d -o hashlake -g hashlake {re.escape(claims)}\b", DOCKERFILE.read_text())


def test_the_image_copies_only_what_exists_and_its_ignore_file_lets_through():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for kw, rest in dockerfile_stages()["ray"]:
        if kw == "COPY" and "--from" not in rest:
            for source in [word for word in rest.split() if not word.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"


# --- start order ---------------------------------------------------------------------------------
def dependencies(service: str) -> dict[str, str]:
    deps = SERVICES[service].get("depends_on", {})
    return {d: "service_started" for d in deps} if isinstance(deps, list) else {
        d: spec.get("condition", "service_started") for d, spec in deps.items()}


def readme_start_order() -> list[set[str]]:
    text = (DEPLOY / "README.md").read_text()
    section = text.split("## Start order", 1)[1].split("\n## ", 1)[0]
    return [{s.strip() for s in m.split(",")} for m in re.findall(r"^\d+\. (.+)$", section, re.M)]


def test_dependencies_give_the_start_order_the_readme_describes():
    graph = {name: set(dependencies(name)) for name in SERVICES}
    order = list(TopologicalSorter(graph).static_order())  # raises on a cycle
    assert set(order) == set(SERVICES)
    step: dict[str, int] = {}
    for name in order:
        step[name] = 1 + max((step[d] for d in graph[name]), default=0)
    by_step = [{n for n, s in step.items() if s == i} for i in range(1, max(step.values()) + 1)]
    assert readme_start_order() == by_step


def test_each_dependency_condition_can_be_met():
    for name in SERVICES:
        for dep, condition in dependencies(name).items():
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert "restart" not in SERVICES[dep], f"{name} waits for {dep} to exit; it is restarted"
    # nothing that needs a model version starts before model-init has made one
    for name in ("intake", "worker", "beat", "ray-head"):
        assert dependencies(name).get("model-init") == "service_completed_successfully", name
    assert dependencies("model-init") == {"minio-init": "service_completed_successfully",
                                          "postgres": "service_healthy"}


# --- secrets -------------------------------------------------------------------------------------
def test_secrets_come_from_the_environment_and_are_required():
    raw = COMPOSE.read_text()
    example = env_example()
    for match in VARIABLE.finditer(raw):
        assert match["name"] in example, f"{match['name']} is read by compose but missing from .env.example"
    for name, svc in raw_compose()["services"].items():
        for variable, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(variable):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}: {variable} is not a required variable"
    secrets = [name for name, value in example.items() if SECRET_NAME.search(name) or name == "MINIO_ROOT_USER"]
    assert "GRAFANA_ADMIN_PASSWORD" in secrets
    for secret in secrets:
        assert not example[secret], f".env.example gives {secret} a value"
        env = filled_env()
        del env[secret]
        with pytest.raises(UnsetVariable, match=secret):
            compose(env)
    assert raw_compose()["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?")


# --- one encode worker per GPU ---------------------------------------------------------------------
def test_encode_workers_are_one_replica_per_gpu_as_one_number():
    for gpus in (1, 2, 8):
        worker = compose(filled_env(ENCODE_GPUS=str(gpus)))["services"]["worker"]
        assert int(worker["deploy"]["replicas"]) == gpus
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]  # each replica picks


@pytest.fixture
def stand_ins(tmp_path):
    """`python` answering the GPU count and `celery` that reports what it was started with, then waits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "$FAKE_GPUS"\n')
    (bin_dir / "celery").write_text('#!/bin/sh\necho "gpu=$CUDA_VISIBLE_DEVICES device=$HASHLAKE_DEVICE args=$*"\n'
                                    'exec sleep 120\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    claims = tmp_path / "claims"
    claims.mkdir()
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GPU_CLAIMS_DIR": str(claims)}


def start_replica(env: dict, gpus: int) -> subprocess.Popen:
    return subprocess.Popen(["sh", str(DEPLOY / "encode-worker.sh")], env={**env, "FAKE_GPUS": str(gpus)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_each_encode_worker_replica_claims_a_gpu_of_its_own(stand_ins):
    replicas: list[subprocess.Popen] = []
    try:
        for _ in range(2):
            replicas.append(start_replica(stand_ins, gpus=2))
            replicas[-1].stdout.readline()  # "claimed GPU i" once its lock is held
        lines = [r.stdout.readline() for r in replicas]
        assert sorted(lines) == ["gpu=0 device=cuda:0 args=-A workers.celery_app worker --pool prefork "
                                 "--concurrency 1 --loglevel INFO --hostname encode-gpu0@%h\n",
                                 "gpu=1 device=cuda:0 args=-A workers.celery_app worker --pool prefork "
                                 "--concurrency 1 --loglevel INFO --hostname encode-gpu1@%h\n"]
        extra = start_replica(stand_ins, gpus=2)
        out, _ = extra.communicate(timeout=30)
        assert extra.returncode == 1 and "all 2 GPUs are claimed" in out
        # the replica on GPU 0 dies: its claim goes with it, and the restarted one takes that GPU
        first = next(r for r, line in zip(replicas, lines) if line.startswith("gpu=0"))
        os.killpg(first.pid, 9)
        first.wait(30)
        replicas.append(start_replica(stand_ins, gpus=2))
        assert replicas[-1].stdout.readline() == "encode worker: claimed GPU 0 of 2\n"
    finally:
        for replica in replicas:
            if replica.poll() is None:
                os.killpg(replica.pid, 9)
            replica.wait(30)
            replica.stdout.close()


def test_an_encode_worker_without_gpus_runs_on_the_cpu(stand_ins):
    replica = start_replica(stand_ins, gpus=0)
    try:
        assert replica.stdout.readline().startswith("gpu= device=cpu args=-A workers.celery_app worker")
    finally:
        os.killpg(replica.pid, 9)
        replica.wait(30)
        replica.stdout.close()


# --- the images' requirements --------------------------------------------------------------------
def image_requirements(role: str) -> list[str]:
    sys.path.insert(0, str(DEPLOY))
    try:
        from image_requirements import requirements
    finally:
        sys.path.remove(str(DEPLOY))
    return requirements(ROOT / "pyproject.toml", role)


def developer_extras() -> set[str]:
    """The distributions of pyproject.toml's extras that no image installs (local, bench, test)."""
    sys.path.insert(0, str(DEPLOY))
    try:
        from image_requirements import DEVELOPER_EXTRAS, requirement_name
    finally:
        sys.path.remove(str(DEPLOY))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {requirement_name(r) for group in DEVELOPER_EXTRAS for r in extras.get(group, [])}


def test_the_worker_image_installs_what_a_worker_needs_and_nothing_of_the_local_stack():
    sys.path.insert(0, str(DEPLOY))
    try:
        from image_requirements import requirement_name
    finally:
        sys.path.remove(str(DEPLOY))
    worker = {requirement_name(r) for r in image_requirements("worker")}
    assert not worker & {"moto", "matplotlib", "faiss-cpu", "pytest", "hypothesis"}
    assert {"moto", "matplotlib", "faiss-cpu", "pytest"} <= developer_extras()
    assert not worker & developer_extras()
    # ray: beat's task and `hashlake retrain` submit through Ray's Jobs client
    assert {"torch", "celery", "minio", "duckdb", "fastapi", "prometheus-client", "ray"} <= worker
    assert all("==" in r for r in image_requirements("worker")), "an image requirement is not pinned"


def test_a_developer_extra_among_the_dependencies_is_refused(tmp_path):
    sys.path.insert(0, str(DEPLOY))
    try:
        from image_requirements import requirements
    finally:
        sys.path.remove(str(DEPLOY))
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["ray==2.60.0", "moto[server]==5.2.5"]\n'
                         '[project.optional-dependencies]\nlocal = ["moto[server]==5.2.5"]\n')
    with pytest.raises(ValueError, match="moto"):
        requirements(pyproject, "worker")


def test_the_ray_image_adds_a_pinned_ray():
    ray = [r for r in image_requirements("ray") if r.startswith("ray")]
    assert ray and all(re.match(r"ray(\[[\w,]+\])?==", r) for r in ray), ray


# --- postgres-init.sh against a real PostgreSQL ----------------------------------------------------
@pytest.fixture
def postgres_server():
    """A fresh PostgreSQL whose superuser is `postgres`, as the postgres image's is."""
    from hashlake.local.services import free_port, start_postgres

    root = Path(tempfile.mkdtemp(prefix="hashlake-test-pg-"))
    root.chmod(0o755)  # run as root, the cluster belongs to the postgres system user
    svc = start_postgres(free_port(), root / "data", superuser="postgres", password="admin-secret", durable=False)
    try:
        yield {"PGHOST": "127.0.0.1", "PGPORT": str(svc.port), "PGPASSWORD": "admin-secret"}
    finally:
        svc.stop()
        shutil.rmtree(root, ignore_errors=True)


def psql(server: dict, user: str, password: str, database: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-U", user, "-d", database, "-Atc", sql],
                          env={**os.environ, **server, "PGPASSWORD": password}, capture_output=True, text=True)


def test_postgres_init_and_lake_init_give_a_writer_and_a_read_only_query_role(postgres_server):
    """postgres-init.sh (the postgres image, on first start), then what `hashlake lake init` does to the
    catalog (model-init), with compose's names: the query role reads what the writer creates, and
    writes nothing."""
    from hashlake.lake.catalog_db import ensure_catalog

    pg_env = environment(SERVICES["postgres"])
    init_env = {"POSTGRES_USER": "postgres", "LAKE_USER": pg_env["LAKE_USER"], "LAKE_PASSWORD": "lake-secret"}
    done = subprocess.run(["sh", str(DEPLOY / "postgres-init.sh")], env={**os.environ, **postgres_server, **init_env},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env = environment(SERVICES["model-init"])
    settings = Settings(pg_host="127.0.0.1", pg_port=int(postgres_server["PGPORT"]),
                        pg_database=env["HASHLAKE_PG_DATABASE"], pg_user=env["HASHLAKE_PG_USER"],
                        pg_password="lake-secret", query_pg_user=env["HASHLAKE_QUERY_PG_USER"],
                        query_pg_password="query-secret")
    assert settings.pg_user == init_env["LAKE_USER"]
    ensure_catalog(settings)
    ensure_catalog(settings)  # every `up` runs it again
    lake_db, writer, reader = settings.pg_database, settings.pg_user, settings.query_pg_user
    as_writer = lambda database, sql: psql(postgres_server, writer, "lake-secret", database, sql)  # noqa: E731
    as_reader = lambda sql: psql(postgres_server, reader, "query-secret", lake_db, sql)  # noqa: E731
    assert as_writer("postgres", f"SELECT rolsuper FROM pg_roles WHERE rolname = '{writer}'").stdout.strip() == "f"
    # the writer creates catalog tables after the init (as the lake does at its first ATTACH)
    made = as_writer(lake_db, "CREATE TABLE ducklake_snapshot (id bigint); INSERT INTO ducklake_snapshot VALUES (1)")
    assert made.returncode == 0, made.stderr
    read = as_reader("SELECT id FROM ducklake_snapshot")
    assert (read.returncode, read.stdout.strip()) == (0, "1"), read.stderr
    for refused in ("INSERT INTO ducklake_snapshot VALUES (2)", "DELETE FROM ducklake_snapshot",
                    "CREATE TABLE elsewhere (id int)", "DROP TABLE ducklake_snapshot"):
        out = as_reader(refused)
        assert out.returncode != 0 and ("permission denied" in out.stderr or "must be owner" in out.stderr), refused
    assert as_writer(lake_db, "SELECT count(*) FROM ducklake_snapshot").stdout.strip() == "1"


# --- the worker image holds every package the code it runs imports --------------------------------
def imported_distributions() -> dict[str, set[str]]:
    """Distribution → the project modules importing it (at module level or inside a function)."""
    import ast
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    found: dict[str, set[str]] = {}
    for package in ("hashlake", "hashing_models", "workers", "scheduler"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    for dist in owners.get(name.split(".")[0], []):
                        found.setdefault(canonical(dist), set()).add(str(path.relative_to(ROOT)))
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for ``requirements``: them and their dependencies, transitively
    (as the installed metadata of this environment declares them)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    todo = [(Requirement(r), frozenset(Requirement(r).extras)) for r in requirements]
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    while todo:
        req, extras = todo.pop()
        key = (canonical(req.name), extras)
        if key in seen:
            continue
        seen.add(key)
        names.add(canonical(req.name))
        try:
            requires = distribution(req.name).requires or []
        except PackageNotFoundError:
            continue
        for spec in map(Requirement, requires):
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if spec.marker is None or any(spec.marker.evaluate(env) for env in environments):
                todo.append((spec, frozenset(spec.extras)))
    return names


def test_the_worker_image_holds_every_package_the_code_imports():
    left_out = developer_extras() | {"ray"}  # moto, matplotlib: imported only where the extra is asked for
    from importlib.metadata import packages_distributions

    from hashlake.lake.extensions import PACKAGES as DUCKDB_EXTENSIONS  # imported by name, at run time

    imported = imported_distributions()
    for module in DUCKDB_EXTENSIONS.values():
        for dist in packages_distributions().get(module, [module]):
            imported.setdefault(canonical(dist), set()).add("hashlake/lake/extensions.py")
    closure = installed_closure(image_requirements("worker"))
    missing = {dist: sorted(modules) for dist, modules in imported.items()
               if dist not in closure and dist not in left_out and dist != "hashlake"}
    assert not missing, f"imported by the project but installed by no pin of pyproject.toml's dependencies: {missing}"
    # psycopg needs a libpq: its binary wheel's own, or the system's (python:slim has none)
    if "psycopg" in closure:
        assert {"psycopg-binary", "psycopg-c"} & closure or "libpq5" in DOCKERFILE.read_text(), \
            "psycopg without a libpq in the image: pin psycopg[binary] or install libpq5 in deploy/Dockerfile"
