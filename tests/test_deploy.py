"""Deployment files stay true to the code: the Dockerfile's and the systemd unit's commands
start a node that answers C-ECHO, Kubernetes manifests validate against the API schemas,
and the compose file, Kubernetes manifests and configs point at each other correctly.
No docker engine or cluster here, so each file is checked by what can run without one."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from plugin.config import load_config
from plugin.pipeline import load_pipelines
from tests.conftest import REPO, free_port

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
VENV_BIN = Path(sys.executable).parent
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


# -- Dockerfile -------------------------------------------------------------------------


class Dockerfile:
    """The few instructions radpipe's Dockerfile uses, read as docker would."""

    def __init__(self, path: Path) -> None:
        text = re.sub(r"\\\n", " ", path.read_text())
        self.copies: list[tuple[list[str], str]] = []
        self.env: dict[str, str] = {}
        self.workdir = "/"
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            instruction, _, rest = line.strip().partition(" ")
            instruction = instruction.upper()
            if instruction == "WORKDIR":
                self.workdir = rest.strip()
            elif instruction == "COPY":
                *sources, target = shlex.split(rest)
                assert not any(s.startswith("--") for s in sources), f"COPY option not understood: {line}"
                absolute = target if target.startswith("/") else f"{self.workdir.rstrip('/')}/{target}"
                self.copies.append((sources, absolute.replace("/./", "/")))
            elif instruction == "ENV":
                self.env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
            elif instruction == "ENTRYPOINT":
                self.entrypoint = json.loads(rest)
            elif instruction == "CMD":
                self.cmd = json.loads(rest)

    def source_of(self, image_path: str) -> Path | None:
        """The repository path that ends up at ``image_path`` in the image, if any. As docker
        does: a directory's contents go into the target; a file goes to the target, or into
        it when the target ends with ``/`` or there are several sources."""
        image = PurePosixPath(image_path)
        for sources, target in reversed(self.copies):  # a later COPY wins
            for source in sources:
                local = REPO / source
                if local.is_dir():
                    root = PurePosixPath(target.rstrip("/") or "/")
                elif target.endswith("/") or len(sources) > 1:
                    root = PurePosixPath(target, local.name)
                else:
                    root = PurePosixPath(target)
                if image == root or root in image.parents:
                    return local.joinpath(*image.relative_to(root).parts)
        return None


def test_every_path_the_dockerfile_copies_exists() -> None:
    dockerfile = Dockerfile(REPO / "Dockerfile")
    sources = [s for sources, _ in dockerfile.copies for s in sources]
    assert "plugin" in sources and "pipelines" in sources
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, missing
    # What the package build needs is copied before `pip install .`.
    for needed in ("pyproject.toml", "README.md"):
        assert needed in sources


def start_node(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)


def wait_for_echo(process: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-4000:]
        echo = subprocess.run(["echoscu", "-aec", "RADPIPE", "127.0.0.1", str(port)], capture_output=True, timeout=30)
        if echo.returncode == 0:
            return
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"node did not answer C-ECHO within {timeout} s:\n{log.read_text()[-4000:]}")


def run_until_echo(command: list[str], env: dict[str, str], tmp_path: Path) -> str:
    """Start ``command``, wait for C-ECHO and /metrics, stop it with SIGTERM; returns its log."""
    port, metrics_port = int(env["RADPIPE_NODE_PORT"]), int(env["RADPIPE_METRICS_PORT"])
    log = tmp_path / "node.log"
    process = start_node(command, env, log)
    try:
        wait_for_echo(process, port, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert b"radpipe_queue_depth" in response.read()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, log.read_text()[-4000:]
    return log.read_text()


def local_environment(tmp_path: Path) -> dict[str, str]:
    """What must differ on this machine: loopback, free ports, storage under tmp."""
    return {
        "RADPIPE_NODE_HOST": "127.0.0.1",
        "RADPIPE_METRICS_HOST": "127.0.0.1",
        "RADPIPE_NODE_PORT": str(free_port()),
        "RADPIPE_METRICS_PORT": str(free_port()),
        "RADPIPE_STORAGE_DIR": str(tmp_path / "data"),
        "RADPIPE_STORAGE_MIN_FREE_MB": "1",
    }


def test_the_image_command_starts_a_node_in_a_plain_venv(tmp_path: Path, dcmtk: None) -> None:
    """ENTRYPOINT + CMD with the image's environment; image paths mapped back to the
    repository files the Dockerfile copies there."""
    dockerfile = Dockerfile(REPO / "Dockerfile")
    assert dockerfile.entrypoint == ["radpipe"]
    assert dockerfile.cmd[:1] == ["serve"]

    def local(value: str) -> str:
        source = dockerfile.source_of(value) if value.startswith("/") else None
        return str(source) if source is not None else value

    image_env = {name: local(value) for name, value in dockerfile.env.items()}
    # The image's own settings must be a valid config with the shipped file.
    config_path = Path(local(dockerfile.cmd[dockerfile.cmd.index("--config") + 1]))
    assert config_path == DEPLOY / "radpipe.yaml"
    config = load_config(config_path, environ=dockerfile.env)
    assert config.node.host == "0.0.0.0" and config.metrics.host == "0.0.0.0"
    assert str(config.pipelines.dir) == str(PurePosixPath(dockerfile.workdir, "pipelines"))
    assert Path(image_env["RADPIPE_PIPELINES_DIR"]) == REPO / "pipelines"

    env = {**os.environ, **image_env, **local_environment(tmp_path)}
    command = [str(VENV_BIN / dockerfile.entrypoint[0]), *map(local, dockerfile.cmd)]
    output = run_until_echo(command, env, tmp_path)
    assert "pipeline lung-nodule-demo" in output


# -- systemd ----------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_verifies_and_its_command_starts_a_node(tmp_path: Path, dcmtk: None) -> None:
    unit = DEPLOY / "radpipe.service"
    installed = {
        "/opt/radpipe/.venv/bin/": f"{VENV_BIN}/",
        "/opt/radpipe/pipelines": str(REPO / "pipelines"),
        "/etc/radpipe/radpipe.yaml": str(DEPLOY / "radpipe.yaml"),
    }

    def local(text: str) -> str:
        for installed_path, here in installed.items():
            text = text.replace(installed_path, here)
        return text

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not installed: run `make test`, which installs the Debian package systemd")
    (tmp_path / "radpipe.service").write_text(local(unit.read_text()))
    verify = subprocess.run(
        [analyze, "verify", str(tmp_path / "radpipe.service")], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    settings = unit_settings(unit)
    [exec_start] = settings["ExecStart"]
    unit_env = dict(pair.split("=", 1) for line in settings.get("Environment", []) for pair in shlex.split(line))
    assert unit_env["RADPIPE_STORAGE_DIR"] in settings["ReadWritePaths"][0].split()
    env = {**os.environ, **{k: local(v) for k, v in unit_env.items()}, **local_environment(tmp_path)}
    run_until_echo(shlex.split(local(exec_start)), env, tmp_path)


# -- Kubernetes -------------------------------------------------------------------------

SERVICE_MONITOR_SCHEMA = {
    # The ServiceMonitor CRD is not in kubernetes-validate's (core API) schemas; this checks
    # the part of the monitoring.coreos.com/v1 shape these manifests use.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": {"type": "object"}},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def manifests() -> list[dict]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def by_kind(kind: str) -> list[dict]:
    return [d for d in manifests() if d["kind"] == kind]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate(version: str) -> None:
    documents = manifests()
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "ServiceMonitor"]
    for document in documents:
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(document, version, strict=True)
            jsonschema.validate(document, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(document, version, strict=True)


def test_kubernetes_validation_rejects_a_broken_manifest() -> None:
    [deployment] = by_kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eleven"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    [monitor] = by_kind("ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "often"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_kubernetes_manifests_fit_together(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    [deployment], [service], [claim], [monitor] = map(
        by_kind, ("Deployment", "Service", "PersistentVolumeClaim", "ServiceMonitor")
    )
    config_maps = {c["metadata"]["name"]: c for c in by_kind("ConfigMap")}
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    # GPU requested (extended resources need a limit; request = limit).
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    # Labels and ports line up: Service -> pod, ServiceMonitor -> Service.
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service_ports.values()} <= set(container_ports)
    assert service_ports["dicom"]["port"] == container_ports["dicom"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= set(service_ports)
    # Volumes: the claim and the config maps exist and are mounted where the config says.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["spool"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    for volume in volumes.values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in config_maps

    # The node config as the pod sees it: file from the ConfigMap + image env + container env.
    image_env = Dockerfile(REPO / "Dockerfile").env
    container_env = {e["name"]: e["value"] for e in container.get("env", [])}
    args = container["args"]
    config_file = PurePosixPath(args[args.index("--config") + 1])
    config_volume = next(n for n, path in mounts.items() if PurePosixPath(path) == config_file.parent)
    (tmp_path / "radpipe.yaml").write_text(
        config_maps[volumes[config_volume]["configMap"]["name"]]["data"]["radpipe.yaml"]
    )
    config = load_config(tmp_path / "radpipe.yaml", environ={**image_env, **container_env})
    assert str(config.storage.dir) == mounts["spool"]
    assert str(config.pipelines.dir) == mounts["pipelines"]
    assert config.node.host == "0.0.0.0" and config.node.port == container_ports["dicom"]
    assert config.metrics.host == "0.0.0.0" and config.metrics.port == container_ports["metrics"]

    # The pipelines ConfigMap is the repository's demo pipeline, with the artifact at the
    # place the image holds it; it loads with radpipe's own loader.
    dockerfile = Dockerfile(REPO / "Dockerfile")
    pipelines = config_maps[volumes["pipelines"]["configMap"]["name"]]["data"]
    assert pipelines, "no pipeline in the ConfigMap"
    for name, text in pipelines.items():
        shipped = yaml.safe_load(text)
        artifact = shipped["model"]["artifact"]
        local_artifact = dockerfile.source_of(artifact)
        assert local_artifact is not None and local_artifact.is_dir(), f"{name}: {artifact} is not in the image"
        repo_version = yaml.safe_load((REPO / "pipelines" / name).read_text())
        repo_version["model"]["artifact"] = artifact
        assert shipped == repo_version, f"{name} differs from pipelines/{name}"
        shipped["model"]["artifact"] = str(local_artifact)
        (tmp_path / "pipelines").mkdir(exist_ok=True)
        (tmp_path / "pipelines" / name).write_text(yaml.safe_dump(shipped))
    loaded = load_pipelines(tmp_path / "pipelines", set(config.destinations))
    assert sorted(f"{p.name}.yaml" for p in loaded) == sorted(pipelines)


# -- compose ----------------------------------------------------------------------------


def test_compose_services_are_wired_together() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"orthanc", "radpipe", "prometheus", "grafana"}
    build = services["radpipe"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"

    mounts: dict[str, dict[str, Path]] = {}  # service -> container path -> local path
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
                mounts.setdefault(name, {})[target] = DEPLOY / source
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} not declared"

    def mounted(service: str, container_path: str) -> Path:
        for target, local in mounts[service].items():
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                return local / container_path[len(target) :].lstrip("/")
        raise AssertionError(f"{service}: nothing mounted at {container_path}")

    # radpipe: the image's settings plus the compose environment.
    environment = {**Dockerfile(REPO / "Dockerfile").env, **services["radpipe"]["environment"]}
    radpipe = load_config(DEPLOY / "radpipe.yaml", environ=environment)
    assert f"{radpipe.node.port}:{radpipe.node.port}" in services["radpipe"]["ports"]
    assert radpipe.storage.dir == Path(services["radpipe"]["volumes"][0].split(":")[1])

    # Orthanc knows radpipe by its service name and port; radpipe sends to Orthanc's.
    orthanc = json.loads(mounted("orthanc", "/etc/orthanc/orthanc.json").read_text())
    assert orthanc["DicomModalities"]["radpipe"] == {"AET": radpipe.node.ae_title, "Host": "radpipe", "Port": 11112}
    [destination] = radpipe.destinations.values()
    assert (destination.ae_title, destination.host, destination.port) == (
        orthanc["DicomAet"],
        "orthanc",
        orthanc["DicomPort"],
    )
    assert any(p.endswith(f":{orthanc['HttpPort']}") for p in services["orthanc"]["ports"])

    # Prometheus scrapes radpipe's metrics port and loads the alert rules.
    command = services["prometheus"]["command"]
    config_path = next(c.split("=", 1)[1] for c in command if c.startswith("--config.file="))
    prometheus = yaml.safe_load(mounted("prometheus", config_path).read_text())
    [job] = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"radpipe:{radpipe.metrics.port}"]
    assert radpipe.metrics.host == "0.0.0.0"
    for rules in prometheus["rule_files"]:
        assert mounted("prometheus", str(PurePosixPath(config_path).parent / rules)).is_file()

    # Grafana reads Prometheus by service name and finds the provisioned dashboard.
    [datasource] = yaml.safe_load(
        mounted("grafana", "/etc/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load(mounted("grafana", "/etc/grafana/provisioning/dashboards/radpipe.yaml").read_text())[
        "providers"
    ]
    assert mounted("grafana", provider["options"]["path"] + "/radpipe.json").is_file()
