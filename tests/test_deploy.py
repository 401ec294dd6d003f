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
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from plugin.config import ROLES, NodeConfig, load_config
from plugin.journal_pg import POOL_SIZE
from plugin.metrics import QUEUES, Metrics
from plugin.pipeline import load_pipelines
from tests.conftest import REPO, free_port
from tests.promql import exported_names, metric_names

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


def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """An object with these properties and no other (as ``kubectl apply --validate=strict``
    refuses a field the resource's schema does not declare)."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def _custom_resource(api_version: str, kind: str, spec: dict) -> dict:
    metadata = {"type": "object", "required": ["name"]}
    return _closed({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": metadata, "spec": spec},
                   ("apiVersion", "kind", "metadata", "spec"))  # fmt: skip


# KEDA's ScaledObject and CloudNativePG's Cluster are not in kubernetes-validate's schemas
# either. Like the ServiceMonitor's above, these check the part of each resource's shape the
# manifests use, written from the projects' documentation (keda.sh/v1alpha1 ScaledObject
# spec, the prometheus scaler's metadata; postgresql.cnpg.io/v1 Cluster spec), not their
# published CRD files: a misspelt or mistyped key is refused.
_QUANTITY = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"}
CUSTOM_SCHEMAS = {
    "ServiceMonitor": SERVICE_MONITOR_SCHEMA,
    "ScaledObject": _custom_resource(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _closed(
            {
                "scaleTargetRef": _closed(
                    {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"}},
                    ("name",),
                ),
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "type": {"const": "prometheus"},
                            "name": {"type": "string"},
                            # the scaler's metadata is a map of strings: a number is refused
                            "metadata": _closed(
                                {
                                    "serverAddress": {"type": "string", "pattern": "^https?://"},
                                    "query": {"type": "string", "minLength": 1},
                                    "threshold": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
                                    "activationThreshold": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
                                },
                                ("serverAddress", "query", "threshold"),
                            ),
                        },
                        ("type", "metadata"),
                    ),
                },
            },
            ("scaleTargetRef", "triggers"),
        ),
    ),
    "Cluster": _custom_resource(
        "postgresql.cnpg.io/v1",
        "Cluster",
        _closed(
            {
                "instances": {"type": "integer", "minimum": 1},
                "storage": _closed({"size": _QUANTITY, "storageClass": {"type": "string"}}, ("size",)),
                "bootstrap": _closed(
                    {"initdb": _closed({"database": {"type": "string"}, "owner": {"type": "string"}})}
                ),
                "postgresql": _closed({"parameters": {"type": "object", "additionalProperties": {"type": "string"}}}),
            },
            ("instances",),
        ),
    ),
}

SCALE_OUT = KUBERNETES / "scale-out"
SAMPLE_DSN = "postgresql://radpipe:secret@radpipe-db-rw.radpipe:5432/radpipe"  # a CloudNativePG app Secret's uri


def manifests(root: Path = KUBERNETES) -> list[dict]:
    """The documents ``kubectl apply -k root`` applies: its kustomization's resources, files
    and (recursively) kustomization folders, in order."""
    documents = []
    for resource in yaml.safe_load((root / "kustomization.yaml").read_text())["resources"]:
        path = root / resource
        if path.is_dir():
            documents += manifests(path)
        else:
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def by_kind(kind: str, root: Path = KUBERNETES) -> list[dict]:
    return [d for d in manifests(root) if d["kind"] == kind]


def validate(document: dict, version: str) -> None:
    """Core resources against the Kubernetes API schemas, custom ones against theirs."""
    if document["kind"] in CUSTOM_SCHEMAS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(document, version, strict=True)
        jsonschema.validate(document, CUSTOM_SCHEMAS[document["kind"]])
    else:
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("root", "kinds"),
    [
        (KUBERNETES, ["ConfigMap", "ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "ServiceMonitor"]),
        (
            SCALE_OUT,
            [
                "Cluster",
                "ConfigMap",
                "ConfigMap",
                "Deployment",
                "Deployment",
                "PersistentVolumeClaim",
                "ScaledObject",
                "Service",
                "Service",
                "ServiceMonitor",
            ],
        ),
    ],
    ids=["single-node", "scale-out"],
)
def test_kubernetes_manifests_validate(root: Path, kinds: list[str], version: str) -> None:
    documents = manifests(root)
    assert sorted(d["kind"] for d in documents) == kinds
    for document in documents:
        validate(document, version)


def test_kubernetes_validation_rejects_a_broken_manifest() -> None:
    [deployment] = by_kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eleven"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    [monitor] = by_kind("ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "often"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    for kind, breaks in [
        ("ScaledObject", lambda spec: spec.update(maxReplicas=8)),  # maxReplicaCount, misspelt
        ("ScaledObject", lambda spec: spec["triggers"][0]["metadata"].update(threshold=20)),  # a string
        ("Cluster", lambda spec: spec.update(instances=0)),
        ("Cluster", lambda spec: spec["bootstrap"]["initdb"].update(databse="radpipe")),
    ]:
        [document] = by_kind(kind, SCALE_OUT)
        validate(document, KUBERNETES_VERSIONS[0])
        breaks(document["spec"])
        with pytest.raises(jsonschema.ValidationError):
            validate(document, KUBERNETES_VERSIONS[0])


def check_kustomization_lists_every_file(root: Path) -> None:
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    files = [r for r in kustomization["resources"] if not (root / r).is_dir()]
    assert sorted(files) == sorted(p.name for p in root.glob("*.yaml") if p.name != "kustomization.yaml")


def mounted_config(
    container: dict, pod: dict, config_maps: dict[str, dict], tmp_path: Path, secrets: dict[tuple[str, str], str]
) -> tuple[NodeConfig, dict[str, str]]:
    """The node config as the container sees it: the file from its ConfigMap + the image's
    environment + the container's (a value from a Secret as ``secrets`` gives it); and
    where each volume is mounted."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for volume in volumes.values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in config_maps
    container_env = {}
    for variable in container.get("env", []):
        if "value" in variable:
            container_env[variable["name"]] = variable["value"]
        elif "secretKeyRef" in variable["valueFrom"]:
            ref = variable["valueFrom"]["secretKeyRef"]
            container_env[variable["name"]] = secrets[(ref["name"], ref["key"])]
        else:  # the pod's own name
            assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", variable
            container_env[variable["name"]] = pod["metadata"]["labels"]["app.kubernetes.io/component"] + "-0"
    args = container["args"]
    config_file = PurePosixPath(args[args.index("--config") + 1])
    config_volume = next(n for n, path in mounts.items() if PurePosixPath(path) == config_file.parent)
    (tmp_path / "radpipe.yaml").write_text(
        config_maps[volumes[config_volume]["configMap"]["name"]]["data"][config_file.name]
    )
    image_env = Dockerfile(REPO / "Dockerfile").env
    config = load_config(tmp_path / "radpipe.yaml", environ={**image_env, **container_env})
    assert str(config.pipelines.dir) == mounts["pipelines"]
    assert volumes["pipelines"]["configMap"]["name"] == "radpipe-pipelines"
    assert config.metrics.host == "0.0.0.0"
    return config, mounts


def check_pipelines_config_map(config_map: dict, destinations: set[str], tmp_path: Path) -> None:
    """The pipelines ConfigMap is the repository's pipelines, with the artifact at the
    place the image holds it; it loads with radpipe's own loader."""
    dockerfile = Dockerfile(REPO / "Dockerfile")
    pipelines = config_map["data"]
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
    loaded = load_pipelines(tmp_path / "pipelines", destinations)
    assert sorted(f"{p.name}.yaml" for p in loaded) == sorted(pipelines)


def test_kubernetes_manifests_fit_together(tmp_path: Path) -> None:
    check_kustomization_lists_every_file(KUBERNETES)
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
    # The claim is mounted where the config says storage is; one node owns it.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["spool"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    config, mounts = mounted_config(container, pod, config_maps, tmp_path, secrets={})
    assert str(config.storage.dir) == mounts["spool"]
    assert config.journal.url is None and deployment["spec"]["replicas"] == 1
    assert config.node.host == "0.0.0.0" and config.node.port == container_ports["dicom"]
    assert config.metrics.port == container_ports["metrics"]
    check_pipelines_config_map(config_maps["radpipe-pipelines"], set(config.destinations), tmp_path)


def exported_metric_names() -> set[str]:
    """Every sample name a node's registry exposes, queue depths included."""
    metrics = Metrics(CollectorRegistry())
    metrics.observe_state(lambda: dict.fromkeys(QUEUES, 0), lambda: 0)
    return exported_names(generate_latest(metrics.registry).decode())


def test_scale_out_manifests_fit_together(tmp_path: Path) -> None:
    """Receivers (receive,assemble,dispatch) behind a LoadBalancer without session affinity;
    GPU workers (infer) scaled by KEDA on a metric radpipe exports; every pod on the RWX
    claim as storage.dir and on the CloudNativePG Cluster's app Secret as journal.url."""
    check_kustomization_lists_every_file(SCALE_OUT)
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind("Deployment", SCALE_OUT)}
    assert set(deployments) == {"receiver", "gpu-worker"}
    services = {s["metadata"]["name"]: s for s in by_kind("Service", SCALE_OUT)}
    config_maps = {c["metadata"]["name"]: c for c in by_kind("ConfigMap", SCALE_OUT)}
    [claim], [database], [scaler], [monitor] = (
        by_kind(kind, SCALE_OUT) for kind in ("PersistentVolumeClaim", "Cluster", "ScaledObject", "ServiceMonitor")
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # CloudNativePG names the application's Secret <cluster>-app; its key uri is the DSN.
    secrets = {(f"{database['metadata']['name']}-app", "uri"): SAMPLE_DSN}
    initdb = database["spec"]["bootstrap"]["initdb"]
    assert SAMPLE_DSN.endswith(f"/{initdb['database']}") and f"//{initdb['owner']}:" in SAMPLE_DSN

    roles: list[str] = []
    configs = {}
    for component, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        [container] = pod["spec"]["containers"]
        (tmp_path / component).mkdir()
        config, mounts = mounted_config(container, pod, config_maps, tmp_path / component, secrets)
        configs[component] = config
        assert config.journal.url == SAMPLE_DSN
        assert config.node.id == f"{component}-0"  # the pod's name
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        shared = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
        assert volumes[shared]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert str(config.storage.dir) == mounts[shared]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == config.metrics.port
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == container["resources"]["requests"].get("nvidia.com/gpu")
        if "infer" in config.node.roles:
            assert gpus == 1 and "receive" not in config.node.roles and "dicom" not in ports
        else:
            assert gpus is None and ports["dicom"] == config.node.port
        roles += config.node.roles
    assert sorted(roles) == sorted(ROLES)  # each role runs, on one kind of pod
    assert configs["receiver"].node.roles == ["receive", "assemble", "dispatch"]
    assert configs["gpu-worker"].node.roles == ["infer"]
    assert configs["receiver"].destinations == configs["gpu-worker"].destinations

    # DICOM: one LoadBalancer address over the receivers only, any association to any of them.
    receivers = deployments["receiver"]["spec"]["template"]["metadata"]["labels"]
    workers = deployments["gpu-worker"]["spec"]["template"]["metadata"]["labels"]
    [dicom] = [s for s in services.values() if s["spec"].get("type") == "LoadBalancer"]
    assert dicom["spec"].get("sessionAffinity", "None") == "None"
    assert dicom["spec"]["selector"].items() <= receivers.items()
    assert not dicom["spec"]["selector"].items() <= workers.items()
    assert [(p["port"], p["targetPort"]) for p in dicom["spec"]["ports"]] == [(configs["receiver"].node.port, "dicom")]
    # Metrics: one Service over every pod, scraped by the ServiceMonitor under job="radpipe".
    [scraped] = [s for s in services.values() if monitor["spec"]["selector"]["matchLabels"].items()
                 <= s["metadata"]["labels"].items()]  # fmt: skip
    assert scraped["metadata"]["name"] == "radpipe"  # the alert rules' job label
    assert scraped["spec"]["selector"].items() <= receivers.items() & workers.items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {p["name"] for p in scraped["spec"]["ports"]}
    # KEDA scales the workers on the jobs queue, read from metrics radpipe exports.
    target = scaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployments["gpu-worker"]["metadata"]["name"])
    [trigger] = scaler["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert metric_names(query) == {"radpipe_queue_depth"} <= exported_metric_names()
    assert re.findall(r'queue="([^"]*)"', query) == ["jobs"] and "jobs" in QUEUES
    assert query.startswith("max(")  # every pod exports the journal-wide depth
    assert float(trigger["metadata"]["threshold"]) > 0
    assert 1 <= scaler["spec"]["minReplicaCount"] <= scaler["spec"]["maxReplicaCount"]
    # PostgreSQL takes every pod's connection pool at the most replicas, with room for a
    # rolling update's extra pods and the operator's own sessions.
    pods = deployments["receiver"]["spec"]["replicas"] + scaler["spec"]["maxReplicaCount"]
    assert int(database["spec"]["postgresql"]["parameters"]["max_connections"]) >= 1.5 * pods * POOL_SIZE


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


def test_compose_scale_out_nodes_share_one_volume_and_one_postgresql() -> None:
    """Two radpipe nodes whose roles make one whole, on the same named volume as storage.dir
    and the compose file's PostgreSQL as journal.url; the receiver is where Orthanc sends."""
    compose = yaml.safe_load((DEPLOY / "compose.scale-out.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"orthanc", "postgres", "radpipe", "radpipe-worker"}
    database = services["postgres"]["environment"]
    image_env = Dockerfile(REPO / "Dockerfile").env
    configs = {}
    for name in ("radpipe", "radpipe-worker"):
        service = services[name]
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"
        config = configs[name] = load_config(DEPLOY / "radpipe.yaml", environ={**image_env, **service["environment"]})
        [volume] = service["volumes"]
        source, target = volume.split(":")[:2]
        assert source in compose["volumes"] and config.storage.dir == Path(target)
        assert config.journal.url is not None
        url = urlsplit(config.journal.url)
        assert (url.hostname, url.port or 5432, url.path) == ("postgres", 5432, f"/{database['POSTGRES_DB']}")
        assert (url.username, url.password) == (database["POSTGRES_USER"], database["POSTGRES_PASSWORD"])
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert [source for source, *_ in (v.split(":") for v in services["radpipe"]["volumes"])] == [
        source for source, *_ in (v.split(":") for v in services["radpipe-worker"]["volumes"])
    ]
    receiver, worker = configs["radpipe"], configs["radpipe-worker"]
    assert sorted(receiver.node.roles + worker.node.roles) == sorted(ROLES)
    assert "receive" in receiver.node.roles and "infer" in worker.node.roles
    assert services["radpipe"]["ports"] == [f"{receiver.node.port}:{receiver.node.port}"]
    assert "ports" not in services["radpipe-worker"]
    assert receiver.destinations == worker.destinations  # the worker records the deliveries
    assert "./orthanc/orthanc.json:/etc/orthanc/orthanc.json:ro" in services["orthanc"]["volumes"]
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    assert orthanc["DicomModalities"]["radpipe"] == {"AET": receiver.node.ae_title, "Host": "radpipe", "Port": 11112}
    [destination] = receiver.destinations.values()
    assert (destination.host, destination.port) == ("orthanc", orthanc["DicomPort"])
