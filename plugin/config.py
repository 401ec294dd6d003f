"""Node configuration (``radpipe.yaml``): every key, its type, default and meaning.

Every option can also be set as an environment variable ``RADPIPE_<SECTION>_<KEY>``
(e.g. ``RADPIPE_NODE_PORT=11113``, ``RADPIPE_STORAGE_DIR=/var/lib/radpipe``); values
are parsed as YAML scalars/lists, so ``RADPIPE_NODE_ALLOWED_CALLING_AETS=[MODALITY1]``
works. Environment variables win over the file. The shipped ``radpipe.yaml`` documents
the same keys with their defaults.
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from plugin.journal import LEASE_SECONDS, default_node_id
from plugin.yamlfile import Location, YAMLError, YAMLFile, read_yaml, validation_errors


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Section):
    """DICOM TLS (PEM files). Example: ``{cert: node.crt, key: node.key, ca: ca.crt}``.
    For the listener, ``ca`` verifies client certificates and ``require_client_cert``
    makes them mandatory (mutual TLS). For a destination, ``ca`` verifies the peer and
    ``cert``/``key`` are this node's client certificate."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False


# A client's name stands where a calling AE title stands for C-STORE (journal, metrics,
# file meta): the same characters and length.
ClientName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,16}$")]


class DicomwebSection(_Section):
    """The STOW-RS endpoint (``POST /studies``, ``POST /studies/{uid}``): studies uploaded
    over HTTP go into the same spool and journal as C-STOREd ones. Off unless ``port`` is set.

    host/port: where to listen (default 127.0.0.1, no port: off). Example: ``{port: 8080}``.
    tls: HTTPS (``cert``/``key``); with ``ca`` and ``require_client_cert: true``, only
    clients with a certificate signed by ``ca`` are served (mutual TLS).
    tokens: client name -> file holding its bearer token; with any, a request must carry
    ``Authorization: Bearer <one of them>`` (the allow-list of AE titles, for HTTP). The
    name is journaled as the calling AE title is. Example: ``{tokens: {uploader: /etc/radpipe/uploader.token}}``.
    max_body_mb: a larger request body is refused (413) before anything is stored (default 2048).
    """

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    tls: TLSConfig = TLSConfig()
    tokens: dict[ClientName, Path] = {}
    max_body_mb: int = Field(default=2048, ge=1)


# What a node does (``node.roles``): receive = the DICOM listener and the STOW-RS endpoint;
# assemble = closing complete series/studies into jobs, and retention; infer = running
# the models; dispatch = sending results. Nodes sharing a PostgreSQL journal and a storage
# folder split them, e.g. receivers behind a load balancer and GPU workers that only infer.
Role = Literal["receive", "assemble", "infer", "dispatch"]
ROLES: tuple[Role, ...] = get_args(Role)


class NodeSection(_Section):
    """The DICOM listener, and what this node does.

    ae_title: this node's AE title (default ``RADPIPE``).
    host/port: where to listen (default 127.0.0.1:11112; use 0.0.0.0 to accept remote peers).
    allowed_calling_aets: if non-empty, only these calling AE titles may associate.
    max_associations: concurrent associations served (default 16); counted when a
    connection is accepted: one more is answered A-ASSOCIATE-RJ (transient, local limit).
    tls: with a certificate, the listener on ``port`` speaks DICOM TLS only.
    plain_port: an extra plain (non-TLS) listener beside a TLS one; null (default) = TLS only.
    max_queued_jobs: with more jobs waiting, C-STORE answers 0xA700 (out of resources).
    shutdown_seconds: on SIGTERM, how long in-flight work may take before the node exits.
    artim_seconds: the PS3.8 ARTIM timer (default 30): a new connection must complete its
    TLS handshake and A-ASSOCIATE-RQ within it, and after this node rejects, releases or
    aborts an association it waits this long for the peer to close. Example: ``10``.
    network_timeout_seconds: silence inside an association before the node aborts it
    (default 60; a modality that pauses between series keeps its association this long);
    also how long a STOW-RS connection may stay silent.
    dicomweb: the optional STOW-RS endpoint (:class:`DicomwebSection`).
    id: this node's name among the nodes sharing a journal: it owns the jobs and deliveries
    the node claims (their leases; ``radpipe status`` shows it). Default ``<hostname>-<pid>``,
    unique per process; give a fixed, unique one (a StatefulSet pod's name) to let a
    restarted node take its own leases back at once instead of after they expire.
    Example: ``radpipe-gpu-0``.
    lease_seconds: how long a claim holds without the node's heartbeat (renewed every third
    of it): a node that dies holds its work this long (default 30).
    roles: what this node runs, any of receive, assemble, infer, dispatch (default: all
    four); a list, or one comma-separated string as ``radpipe serve --roles`` takes it.
    Every node serves /metrics and renews its leases. A node without ``infer`` never
    loads a model; one with neither ``assemble`` nor ``infer`` reads no pipeline.
    Example: ``roles: [receive, assemble, dispatch]`` (``RADPIPE_NODE_ROLES=receive,dispatch``).
    """

    ae_title: str = Field(default="RADPIPE", min_length=1, max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = []
    max_associations: int = Field(default=16, ge=1)
    tls: TLSConfig = TLSConfig()
    plain_port: int | None = Field(default=None, ge=0, le=65535)
    max_queued_jobs: int = Field(default=10000, ge=1)
    shutdown_seconds: float = Field(default=30.0, gt=0)
    artim_seconds: float = Field(default=30.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    dicomweb: DicomwebSection = DicomwebSection()
    id: str = Field(default_factory=default_node_id, min_length=1, max_length=200)
    lease_seconds: float = Field(default=LEASE_SECONDS, gt=0)
    roles: list[Role] = Field(default=list(ROLES), min_length=1)

    @field_validator("roles", mode="before")
    @classmethod
    def _split(cls, roles: object) -> object:
        """``receive,dispatch`` (the command line's and an environment variable's form) as a
        list; an unknown role is named with the ones there are."""
        if isinstance(roles, str):
            roles = [part.strip() for part in roles.split(",")]
        unknown = [role for role in roles if role not in ROLES] if isinstance(roles, list) else []
        if unknown:
            raise ValueError(f"unknown role {', '.join(map(repr, unknown))}: roles are {', '.join(ROLES)}")
        if isinstance(roles, list) and len(set(roles)) != len(roles):
            raise ValueError(f"a role is given twice: {', '.join(roles)}")
        return roles


class StorageSection(_Section):
    """dir: where spool, journal, results and quarantine live (default ``./radpipe-data``).
    min_free_mb: below this much free space C-STORE answers 0xA700 (out of resources).
    max_instance_mb: an instance whose pixels would decode to more is refused (0xA900).
    retention_days: delivered studies older than this are purged (0 keeps everything);
    nothing undelivered is ever purged."""

    dir: Path = Path("radpipe-data")
    min_free_mb: int = Field(default=1024, ge=0)
    max_instance_mb: int = Field(default=2048, ge=1)
    retention_days: float = Field(default=30.0, ge=0)


# A password in a connection URI: user:PASSWORD@ or ?password=PASSWORD.
_URI_PASSWORD = re.compile(r"(?<=://)([^:@/]*):[^@/]*@|(?<=[?&]password=)[^&]*")


class JournalSection(_Section):
    """Where the journal (every instance, job and delivery) lives.

    url: null (default) = the SQLite file ``journal.sqlite`` in ``storage.dir``, for one
    node; a ``postgresql://`` URL (libpq's connection URI; its query may add libpq options
    such as ``sslmode=verify-full``) = PostgreSQL, which several nodes can share. The node
    creates the tables on first use; the database and its role are the operator's. A node
    started while the server is down waits for it (log line, ``radpipe_journal_up`` 0).
    The effective config is logged with the password masked.
    Example: ``journal: {url: "postgresql://radpipe:secret@db.example:5432/radpipe"}``.
    """

    url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")

    @field_serializer("url")
    def _masked(self, url: str | None) -> str | None:
        if url is None:
            return None
        return _URI_PASSWORD.sub(lambda m: f"{m.group(1)}:***@" if m.group(1) is not None else "***", url)


class MetricsSection(_Section):
    """Prometheus exposition at ``http://host:port/metrics`` (default 127.0.0.1:9400).
    ``port: 0`` disables it."""

    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, le=65535)


class PipelinesSection(_Section):
    """dir: the folder of pipeline YAML files (default ``./pipelines``)."""

    dir: Path = Path("pipelines")


class RunnerSection(_Section):
    """concurrent_jobs: jobs run at once, each by a lane (a thread) of its own that shares
    the cores with the others; with 2 (default), one job's model computes while another's
    headers, preprocessing and SR are made. Volume jobs run one at a time whatever it says.
    decode_workers: processes that decode and preprocess images while the model runs,
    shared out among the lanes; ``auto`` (default) is one per CPU core beyond two, so none
    on a 2-core machine, where the model's threads already use both cores. 0 decodes in
    each lane's own thread."""

    concurrent_jobs: Annotated[int, Field(ge=1, le=64)] = 2
    decode_workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = "auto"

    @property
    def lane_workers(self) -> list[int]:
        """Each lane's decode worker processes."""
        total = max(0, (os.cpu_count() or 1) - 2) if self.decode_workers == "auto" else self.decode_workers
        lanes = self.concurrent_jobs
        return [total // lanes + (lane < total % lanes) for lane in range(lanes)]


class DispatchSection(_Section):
    """How results are sent. Each destination has its own sender, so a slow or dead one
    delays no other, and sends every result due to it over one association.

    A failed try is retried after ``backoff_seconds`` x 2^(try-1), at most
    ``max_backoff_seconds`` apart, until ``give_up_after_seconds`` after the first try
    (default 24 h) or ``tries`` attempts (default: no limit); then the delivery is
    dead-lettered (``radpipe retry --dead-letter`` requeues it).

    Timeouts, in seconds, bound every try, so a destination that accepts TCP and never
    answers costs one timeout, not an open-ended wait:
    connect_timeout_seconds: the TCP connection (default 10).
    acse_timeout_seconds: the answer to the association request, and to its release (default 20).
    dimse_timeout_seconds: the answer to each C-STORE (default 60: a PACS may commit a
    large object before it answers).
    network_timeout_seconds: silence on an open association before it is aborted (default 60).
    Example: ``dispatch: {acse_timeout_seconds: 30, tries: 50}``.
    """

    tries: int | None = Field(default=None, ge=1)
    backoff_seconds: float = Field(default=2.0, ge=0)
    max_backoff_seconds: float = Field(default=600.0, ge=0)
    give_up_after_seconds: float = Field(default=86400.0, gt=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    acse_timeout_seconds: float = Field(default=20.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)


class BasicAuth(_Section):
    """HTTP basic authentication: ``user`` and the file holding the password."""

    user: str = Field(min_length=1)
    password_file: Path


class DicomwebAuth(_Section):
    """How radpipe authenticates to a DICOMweb destination: one of ``bearer_token_file``
    (read again for every try, so a token renewed in the file by another process is
    picked up) or ``basic``."""

    bearer_token_file: Path | None = None
    basic: BasicAuth | None = None

    @model_validator(mode="after")
    def _one(self) -> "DicomwebAuth":
        if (self.bearer_token_file is None) == (self.basic is None):
            raise ValueError("give one of bearer_token_file or basic")
        return self


class Destination(_Section):
    """A node results are sent to: a DICOM node by C-STORE (``ae_title``, ``host``,
    ``port``), or a DICOMweb service by STOW-RS (``url``, its base, to which
    ``/studies`` is appended; ``auth`` optional). ``tls``: for C-STORE DICOM TLS; for an
    ``https`` url, ``ca`` replaces the system's roots and ``cert``/``key`` is a client certificate.
    Examples: ``pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}``,
    ``web: {url: http://127.0.0.1:8042/dicom-web, auth: {basic: {user: radpipe, password_file: orthanc.pw}}}``."""

    ae_title: str | None = Field(default=None, min_length=1, max_length=16)
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    url: str | None = Field(default=None, pattern=r"^https?://[^/?#]+(/[^?#]*)?$")
    auth: DicomwebAuth | None = None
    tls: TLSConfig | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "Destination":
        dimse = (self.ae_title, self.host, self.port)
        if self.url is None and None in dimse:
            raise ValueError("give ae_title, host and port (C-STORE) or url (DICOMweb STOW-RS)")
        if self.url is not None and any(value is not None for value in dimse):
            raise ValueError("give either url (DICOMweb) or ae_title/host/port (C-STORE), not both")
        if self.url is None and self.auth is not None:
            raise ValueError("auth applies to a url (DICOMweb) destination only")
        return self


class NodeConfig(_Section):
    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    journal: JournalSection = JournalSection()
    metrics: MetricsSection = MetricsSection()
    pipelines: PipelinesSection = PipelinesSection()
    runner: RunnerSection = RunnerSection()
    dispatch: DispatchSection = DispatchSection()
    destinations: dict[str, Destination] = {}

    @property
    def results_dir(self) -> Path:
        return self.storage.dir / "results"

    @property
    def journal_location(self) -> Path | str:
        """What :class:`plugin.journal.Journal` opens: the PostgreSQL URL, or the SQLite file."""
        return self.journal.url or self.storage.dir / "journal.sqlite"


class ConfigError(Exception):
    """The node configuration is invalid; ``str()`` is one ``file:line:column: key: message``
    line per bad key (``RADPIPE_<SECTION>_<KEY>: ...`` for a value from the environment)."""


PREFIX = "RADPIPE_"


def _overlay(raw: dict[str, Any], overrides: Mapping[str, tuple[str, str, Any]]) -> dict[Location, str]:
    """Set ``section.key`` in the raw config mapping for each ``name: (section, key,
    value)``; returns the name that set each (section, key), so that errors can name it."""
    applied: dict[Location, str] = {}
    for name, (section, key, value) in overrides.items():
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][key] = value
            applied[(section, key)] = name
    return applied


def _environment(environ: Mapping[str, str]) -> dict[str, tuple[str, str, Any]]:
    """The ``RADPIPE_<SECTION>_<KEY>`` variables as overrides, their values read as YAML."""
    overrides = {}
    for name, text in environ.items():
        if not name.startswith(PREFIX):
            continue
        section, _, key = name[len(PREFIX) :].lower().partition("_")
        if section in NodeConfig.model_fields and key:
            overrides[name] = (section, key, yaml.safe_load(text) if text else None)
    return overrides


def _anchored(raw: Any, annotation: Any, base: Path) -> Any:
    """``raw`` with every value that ``annotation`` types as a Path taken relative to
    ``base`` (an absolute path stays as it is)."""
    kinds = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    for kind in kinds:
        if kind is Path and isinstance(raw, str):
            return str(base / raw)
        if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(raw, dict):
            fields = kind.model_fields
            return {k: _anchored(v, fields[k].annotation, base) if k in fields else v for k, v in raw.items()}
        if get_origin(kind) is dict and isinstance(raw, dict):
            return {k: _anchored(v, get_args(kind)[1], base) for k, v in raw.items()}
    return raw


def _read_file(path: Path) -> tuple[YAMLFile, dict[str, Any]]:
    """The file with its key positions, and its mapping with relative paths made absolute."""
    try:
        source = read_yaml(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}:1:1: cannot read: {e}") from e
    except YAMLError as e:
        raise ConfigError(str(e)) from e
    if source.data is not None and not isinstance(source.data, dict):
        raise ConfigError(f"{source.where(())}: the node config must be a mapping")
    # The folder, not the file, is resolved: a Kubernetes ConfigMap mounts the file as a
    # link into a hidden folder that changes with every update.
    return source, _anchored(source.data or {}, NodeConfig, path.parent.resolve())


def load_config(
    path: Path | None,
    environ: Mapping[str, str] = os.environ,
    options: Mapping[str, tuple[str, str, Any]] | None = None,
) -> NodeConfig:
    """Read the node config (or defaults when ``path`` is None) plus the environment plus
    command-line ``options`` (``{"--roles": ("node", "roles", "receive")}``), each
    winning over the ones before; an error names the option or variable that set the key.

    Relative paths in the file are relative to the file's folder, as in Orthanc's
    configuration: the node finds the same pipelines and storage whatever folder it is
    started from. Relative paths from the environment or the defaults are relative to
    the working directory."""
    source, raw = _read_file(path) if path is not None else (None, {})
    given = _overlay(raw, _environment(environ)) | _overlay(raw, options or {})

    def where(location: Location) -> str:
        if (name := given.get(location[:2])) is not None:
            return name
        return source.where(location) if source is not None else "defaults"

    try:
        return NodeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(validation_errors(e, where))) from e
