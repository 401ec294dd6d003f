"""The ``radpipe`` command: argument parsing and wiring only."""

import argparse
import gc
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from plugin import __version__
from plugin.logs import FORMATS, trace_id
from plugin.logs import configure as configure_logging

if TYPE_CHECKING:
    from plugin.config import NodeConfig
    from plugin.journal import Journal

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms).
GIL_SWITCH_SECONDS = 0.0005

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Handler, list[tuple[tuple[str, ...], dict]]]] = {}


def arg(*names: str, **options: object) -> tuple[tuple[str, ...], dict]:
    return names, options


def command(*arguments: tuple[tuple[str, ...], dict]) -> Callable[[Handler], Handler]:
    """Register a subcommand; its docstring is its help text."""

    def register(handler: Handler) -> Handler:
        _COMMANDS[handler.__name__.rstrip("_")] = (handler, list(arguments))  # import_ -> import
        return handler

    return register


CONFIG = arg("--config", type=Path, help="node config file (radpipe.yaml); default: built-in defaults")


def _journal_location(config: "NodeConfig") -> Path | str | None:
    """The node's journal, as ``journal.url`` names it (PostgreSQL) or its SQLite file;
    None, with the reason printed, when that file does not exist."""
    location = config.journal_location
    if isinstance(location, str) or location.is_file():
        return location
    print(f"no journal at {location.absolute()}: has the node run with this config?")
    return None


def _since(age: str | None) -> float | None:
    """``--since AGE`` as epoch seconds (0: all); None, with the reason printed, for a bad AGE."""
    from plugin.replay import parse_duration

    try:
        return time.time() - parse_duration(age) if age else 0.0
    except ValueError as e:
        print(f"--since: {e}")
        return None


def _freeze_what_loading_made() -> None:
    """What loading made (torch, pydicom's dictionaries, highdicom's tables: some 500k
    objects) lives as long as the process. Frozen, it is out of the garbage collector's
    sight; otherwise each full collection walks it: 200-250 ms, a few times in the first
    series received, with every association waiting. Done before the node says it is
    ready: the collection itself holds every association for as long."""
    gc.collect()
    gc.freeze()


@command(
    CONFIG,
    arg(
        "--roles",
        metavar="ROLE,...",
        help="what this node runs, of receive,assemble,infer,dispatch (default: node.roles, all four); "
        "wins over the config file and RADPIPE_NODE_ROLES",
    ),
)
def serve(args: argparse.Namespace) -> int:
    """Run the DICOM node until SIGINT/SIGTERM."""
    from plugin.app import Node
    from plugin.config import load_config

    config = load_config(args.config, options={"--roles": ("node", "roles", args.roles)} if args.roles else None)
    logging.getLogger(__name__).info("effective config: %s", config.model_dump_json())
    node = Node(config)
    # An association thread takes the GIL back after every recv and every flush; at Python's
    # default switch interval a busy runner thread keeps it up to 5 ms each time.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    stop = threading.Event()
    # listens, then loads pipelines and models, then says it is ready
    node.start(wait_ready=False, failed=stop.set, settle=_freeze_what_loading_made)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    node.stop()
    if node.load_error is not None:  # an invalid pipeline at start: printed by main, exit 1
        raise node.load_error
    return 0


@command(
    CONFIG,
    arg("paths", nargs="+", type=Path, help="node config or pipeline files, folders of pipelines, or artifact folders"),
)
def validate(args: argparse.Namespace) -> int:
    """Check node config and pipeline files (and that each pipeline's model is intact and takes what its
    preprocessing yields), or artifact folders (loaded as the node loads them); print one line per error."""
    import torch
    import yaml

    from plugin.config import ConfigError, load_config
    from plugin.models.artifact import MANIFEST, ArtifactError, describe, load_artifact, serving_problem
    from plugin.pipeline import PipelineError, load_pipeline_files, pipeline_files, read_pipeline

    destinations = set(load_config(args.config).destinations)
    pipelines: list[Path] = []
    failed = False
    for path in args.paths:
        if (path / MANIFEST).is_file():
            try:
                print(f"{path}: ok ({describe(load_artifact(path, torch.device('cpu')).manifest)})")
            except ArtifactError as e:
                print(e)
                failed = True
            continue
        if path.is_dir():
            pipelines += pipeline_files(path)
            continue
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            raw = None  # the pipeline loader reports the exact problem
        if isinstance(raw, dict) and "model" not in raw and "match" not in raw:
            try:
                load_config(path, environ={})
                print(f"{path}: ok (node config)")
            except ConfigError as e:
                print(e)
                failed = True
        else:
            pipelines.append(path)
    try:
        for pipeline in load_pipeline_files(pipelines, destinations):
            problem = serving_problem(pipeline)
            if problem is None:
                print(f"{pipeline.source}: ok ({pipeline.name} v{pipeline.version})")
            else:
                assert pipeline.source is not None  # read from a file just now
                _, source, _ = read_pipeline(pipeline.source)  # again, for the line and column
                print(
                    f"{source.where(('model', 'artifact')) if source else pipeline.source}: model.artifact: {problem}"
                )
                failed = True
    except PipelineError as e:
        print(e)
        failed = True
    return 1 if failed else 0


@command(
    CONFIG,
    arg("--explain", action="store_true", help="say why each pipeline matches or not"),
    arg("files", nargs="+", type=Path, help="DICOM files"),
)
def route(args: argparse.Namespace) -> int:
    """Show which pipelines would run on each DICOM file; exit 1 if a file cannot be read."""
    from plugin.app import read_pipelines
    from plugin.config import load_config
    from plugin.router import Router, UnreadableFile, read_header

    router = Router(read_pipelines(load_config(args.config)))
    failed = False
    for path in args.files:
        try:
            header = read_header(path)
        except UnreadableFile as e:
            print(f"{path}: {e}")
            failed = True
            continue
        print(f"{path}:")
        for verdict in router.explain(header):
            p = verdict.pipeline
            if verdict.failure is None:
                print(f"  match     {p.name} v{p.version}")
            elif args.explain:
                print(f"  no match  {p.name} v{p.version}: {verdict.failure}")
    return 1 if failed else 0


@command(
    CONFIG,
    arg("--since", metavar="AGE", help="only what arrived in this last span: 30m, 12h, 7d, 2w (default: all)"),
    arg("--run", action="store_true", help="also run it on those series' instances in the spool; nothing is sent"),
    arg("--out", type=Path, default=Path("radpipe-replay"), help="where --run keeps its journal and results"),
    arg("pipeline", type=Path, help="pipeline file (need not be in the pipelines folder)"),
)
def replay(args: argparse.Namespace) -> int:
    """Judge a pipeline's match and completion rules over the series the node received (from the
    journal; nothing is re-sent): the series it would take, and why not the others. With --run,
    also run it on them, results kept in --out."""
    from plugin.config import load_config
    from plugin.journal import Journal
    from plugin.pipeline import load_pipeline_files
    from plugin.replay import replay, report, run_locally, run_report

    since = _since(args.since)
    if since is None:
        return 1
    config = load_config(args.config)
    (pipeline,) = load_pipeline_files([args.pipeline], set(config.destinations))
    location = _journal_location(config)
    if location is None:
        return 1
    if args.run and (args.out / "journal.sqlite").exists():
        print(f"{args.out} holds an earlier run: choose another --out")
        return 1
    journal = Journal(location)
    try:
        verdicts = replay(pipeline, journal, since)
        print("\n".join(report(pipeline, verdicts, since)))
        if args.run:
            local = run_locally(pipeline, journal, verdicts, args.out, since)
            try:
                print("\n".join(run_report(local, args.out)))
            finally:
                local.close()
    finally:
        journal.close()
    return 0


@command(
    CONFIG,
    arg("--since", metavar="AGE", help="only series the shadow finished in this last span: 30m, 12h, 7d, 2w"),
    arg("live", help="name of the live pipeline (the reference)"),
    arg("shadow", help="name of the shadow pipeline that shadows it"),
)
def compare(args: argparse.Namespace) -> int:
    """Compare a shadow pipeline with the live one it shadows, from the journal: per finding
    agreement, sensitivity and specificity (the live result as reference), and every series
    where they disagree, by Study/Series Instance UID."""
    from plugin.compare import report
    from plugin.config import load_config
    from plugin.journal import Journal

    since = _since(args.since)
    if since is None:
        return 1
    location = _journal_location(load_config(args.config))
    if location is None:
        return 1
    journal = Journal(location)
    try:
        pairs = journal.finding_pairs(args.live, args.shadow, since)
    finally:
        journal.close()
    print("\n".join(report(args.live, args.shadow, pairs, since)))
    return 0


@command(
    CONFIG,
    arg("--jobs", type=int, default=10, help="how many recent jobs to list"),
    arg("--trace", metavar="ID", help="only this study's path: instances, jobs and deliveries"),
    arg("--study", metavar="UID", help="the same, by StudyInstanceUID"),
)
def status(args: argparse.Namespace) -> int:
    """Show the pipelines folder, queues, leases (which node holds which job or delivery, until
    when), recent jobs, failed jobs and dead letters with their studies' trace ids; with --trace
    or --study, one study's path (reads the journal)."""
    from plugin.app import read_pipelines
    from plugin.config import load_config
    from plugin.journal import Journal
    from plugin.pipeline import PipelineError

    config = load_config(args.config)
    directory = config.pipelines.dir.absolute()
    try:
        names = [f"{p.name} v{p.version}" for p in read_pipelines(config)]
        print(f"pipelines: {len(names)} in {directory}" + (f": {', '.join(names)}" if names else ""))
    except PipelineError:
        print(f"pipelines: invalid set in {directory} (radpipe validate {directory} lists the errors)")
    location = _journal_location(config)
    if location is None:
        return 1
    journal = Journal(location)
    try:
        if args.trace or args.study:
            study = args.study or journal.study_of_trace(args.trace)
            if study is None:
                print(f"trace {args.trace}: no such study in the journal")
                return 1
            print("\n".join(study_path(journal, study)))
            return 0
        print("queues: " + ", ".join(f"{name}={depth}" for name, depth in journal.queue_depths().items()))
        print("\n".join(lease_lines(journal)))
        print("recent jobs:")
        for job in journal.recent_jobs(args.jobs):
            error = f"  {job.error}" if job.error else ""
            trace = trace_id(journal.batch_study(job.batch_id) or "")
            print(f"  #{job.id:<5} {job.status:<8} trace={trace} {job.pipeline} v{job.pipeline_version}{error}")
        failed = [j for j in journal.jobs() if j.status == "failed"]
        print(f"failed jobs: {len(failed)}" + ("  (radpipe retry)" if failed else ""))
        for job in failed:
            print(f"  #{job.id} trace={trace_id(journal.batch_study(job.batch_id) or '')} {job.pipeline}: {job.error}")
        dead = journal.deliveries(status="dead")
        print(f"dead letters: {len(dead)}" + ("  (radpipe retry --dead-letter)" if dead else ""))
        for delivery in dead:
            trace = trace_id(delivery.study_instance_uid)
            print(f"  trace={trace} {delivery.name}: {delivery.attempts} tries, {delivery.last_error}")
    finally:
        journal.close()
    return 0


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def lease_lines(journal: "Journal") -> list[str]:
    """Which node holds which running job or delivery, until when (expired: any node may take it)."""
    leases = journal.leases()
    now = time.time()
    lines = [f"leases: {len(leases)}"]
    for lease in leases:
        what = f"job #{lease.job_id} {lease.pipeline}"
        if lease.destination is not None:  # a delivery: which of the job's results, and where
            what += f" {(lease.kind or '').upper()} -> {lease.destination}"
        expired = "  (expired)" if lease.until < now else ""
        lines.append(f"  {what}: {lease.owner} until {_when(lease.until)}{expired}")
    return lines


def study_path(journal: "Journal", study_uid: str) -> list[str]:
    """One study's way through the node, as ``status --trace`` prints it."""
    count, first, last = journal.study_received(study_uid)
    lines = [
        f"trace {trace_id(study_uid)}: study {study_uid}",
        f"instances: {count} received, {_when(first)} .. {_when(last)}",
    ]
    jobs = journal.study_jobs(study_uid)
    lines.append(f"jobs: {len(jobs)}")
    for job in jobs:
        error = f"  {job.error}" if job.error else ""
        lines.append(
            f"  #{job.id:<5} {job.status:<8} {job.pipeline} v{job.pipeline_version} created {_when(job.created_at)},"
            f" started {_when(job.started_at)}, finished {_when(job.finished_at)}{error}"
        )
    deliveries = journal.deliveries(study_uid=study_uid)
    lines.append(f"deliveries: {len(deliveries)}")
    for d in deliveries:
        error = f"  {d.last_error}" if d.last_error else ""
        lines.append(f"  {d.name}: {d.status}, {d.attempts} tries{error}")
    return lines


@command(
    CONFIG,
    arg("--dead-letter", action="store_true", help="requeue dead-lettered deliveries instead of failed jobs"),
    arg("--study", metavar="UID", help="only this study (StudyInstanceUID)"),
)
def retry(args: argparse.Namespace) -> int:
    """Requeue failed jobs (or, with --dead-letter, dead-lettered deliveries); a running node picks them up."""
    from plugin.config import load_config
    from plugin.journal import Journal

    location = _journal_location(load_config(args.config))
    if location is None:
        return 1
    journal = Journal(location)
    try:
        if args.dead_letter:
            print(f"requeued {journal.requeue_dead_letters(args.study)} dead-lettered deliveries")
        else:
            print(f"requeued {journal.requeue_failed_jobs(args.study)} failed jobs")
    finally:
        journal.close()
    return 0


@command(
    arg("--host", default="127.0.0.1"),
    arg("--port", type=int, default=11112),
    arg("--called-ae", default="RADPIPE"),
    arg("--results", type=Path, default=Path("radpipe-data/results"), help="the node's results folder"),
    arg("--timeout", type=float, default=60.0, help="seconds to wait for the results"),
    arg("--seed", type=int, help="make the same study again (default: a new one each run)"),
)
def demo(args: argparse.Namespace) -> int:
    """Send a synthetic chest-CT study to a running node; print both demo pipelines' results and the truth."""
    from plugin.demo.client import run_demo

    with tempfile.TemporaryDirectory() as work:
        return run_demo(args.host, args.port, args.called_ae, args.results, Path(work), args.timeout, args.seed)


def _input_shape(text: str) -> object:
    from plugin.models.inputspec import InputSpec

    try:
        return InputSpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object of keyword arguments, e.g. '{\"width\": 16}'")
    return value


@command(
    arg("source", help="a .pt2 (torch.export.save), an .onnx file, a MONAI bundle folder, or an architecture id"),
    arg("--out", type=Path, required=True, help="the artifact folder to write, e.g. pipelines/models/NAME"),
    arg("--name", help="the model's name in the manifest and the metrics (default: the folder's name)"),
    arg("--classes", type=lambda text: [c.strip() for c in text.split(",")], help="class names in output order: C1,C2"),
    arg(
        "--task",
        choices=["classification", "segmentation"],
        default="classification",
        help="classification: one logit per class; segmentation: one per class and voxel (default: classification)",
    ),
    arg("--input", type=_input_shape, help="CxHxW or CxDxHxW (? for any size) where the source does not record it"),
    arg("--weights", type=Path, help="for an architecture id: safetensors, or a state dict saved with torch.save"),
    arg("--params", type=_json_object, default={}, help="for an architecture id: its keyword arguments, as JSON"),
    arg("--force", action="store_true", help="replace --out if it exists"),
)
def import_(args: argparse.Namespace) -> int:
    """Turn a model into an artifact: checked, every file hashed, loaded and run once as the node will."""
    from plugin.models.artifact import describe
    from plugin.models.importer import ImportRefused, ImportRequest, import_model

    request = ImportRequest(
        source=args.source,
        out=args.out,
        name=args.name,
        classes=args.classes,
        task=args.task,
        input=args.input,
        weights=args.weights,
        params=args.params,
        force=args.force,
    )
    try:
        target, imported = import_model(request)
    except ImportRefused as e:
        print(f"radpipe import: {e}")
        return 1
    print(f"wrote {target}: {describe(imported.manifest)}")
    if imported.pipeline:
        import yaml

        fragment = yaml.safe_dump(imported.pipeline, sort_keys=False, default_flow_style=None)
        print("pipeline keys translated from the source (for the pipeline YAML):")
        print("".join(f"  {line}\n" for line in fragment.splitlines()), end="")
    for note in imported.notes:
        print(f"  note: {note}")
    return 0


@command(
    arg("pipeline", type=Path, help="pipeline YAML whose model to optimize"),
    arg("--recipe", type=Path, help="recipe file (default: the pipeline's model.optimize)"),
    arg("--out", type=Path, help="artifact folder to write (default: beside the original, e.g. NAME-pruned-int8)"),
    arg("--force", action="store_true", help="replace --out if it exists"),
)
def optimize(args: argparse.Namespace) -> int:
    """Prune, fine-tune and quantize a pipeline's model; write it only if it passes the accuracy gate."""
    from plugin.accel.optimize import run

    return run(args.pipeline, args.recipe, args.out, args.force)


@command(
    arg("target", type=Path, help="a pipeline YAML, or an optimized artifact folder"),
    arg("--optimized", type=Path, help="optimized artifact to compare (default: run the pipeline's recipe)"),
    arg("--out", type=Path, default=Path("bench-results"), help="folder for bench.json and bench.png"),
    arg("--heldout", type=int, default=1000, help="held-out phantom images for the AUC column (classifiers)"),
    arg(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8, 32],
        help="classifiers (a segmentation model: 1 and its sliding window's sw_batch_size, on its recipe's volumes)",
    ),
    arg("--seconds", type=float, default=3.0, help="measuring time per variant and batch size"),
    arg("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: torch's default)"),
)
def bench(args: argparse.Namespace) -> int:
    """fp32, compiled, pruned, int8 and ONNX Runtime side by side: latency, images/s, size, AUC."""
    from plugin.accel.bench import run

    return run(args.target, args.optimized, args.out, args.heldout, args.batch_sizes, args.seconds, args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radpipe", description="DICOM AI node")
    parser.add_argument("--version", action="version", version=f"radpipe {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--log-format", default="text", choices=FORMATS, help="one line per event: text (default) or JSON"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (handler, arguments) in _COMMANDS.items():
        sub = commands.add_parser(name, help=handler.__doc__, description=handler.__doc__)
        for names, options in arguments:
            sub.add_argument(*names, **options)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.log_level != "DEBUG":
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied module is noise at INFO
        logging.getLogger("openjpeg").setLevel(logging.WARNING)  # as is a line per frame a SEG compresses
        # pynetdicom serves the dispatcher's SCU, which logs each failed try once with its cause;
        # pynetdicom's own lines would repeat it (two per refused connection, a traceback per
        # failed TLS handshake). The acceptor folds what pynetdicom logs into its abort lines.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    from plugin.config import ConfigError
    from plugin.journal import JournalUnavailable

    try:
        return args.handler(args)
    except (ConfigError, JournalUnavailable) as e:
        print(e)
        return 1
    except Exception as e:
        # Imported only now: plugin.pipeline imports torch, which a receive-only node never
        # needs; a PipelineError comes from a command that has imported it already.
        from plugin.pipeline import PipelineError

        if not isinstance(e, PipelineError):
            raise
        print(e)
        return 1
