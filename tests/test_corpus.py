"""Every image file that pydicom's test files, pydicom-data and deid-data ship, through a
catch-all pipeline writing an SR and a KOS for each, on a node in its own process: every
object written passes dciodvfy, and whatever cannot be processed is refused at receipt
or fails its job with a named reason while the node keeps serving, with no traceback in
its log."""

import json
import re
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pynetdicom
import yaml
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from plugin.config import NodeConfig
from tests.conftest import (
    DEID_HUMANS,
    PYDICOM_DATA,
    PYDICOM_FILES,
    REPO,
    dciodvfy_errors,
    echo_ok,
    free_port,
    node_config,
    read_journal,
    serve,
    wait_for,
    write_pipeline,
)

CORPORA = {"pydicom": PYDICOM_FILES, "pydicom-data": PYDICOM_DATA, "deid-data": DEID_HUMANS}
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)


def write_copies(out_dir: str) -> list[dict]:
    """Each image file of the corpora (pydicom reads it, it has Rows and pixel data),
    written again under fresh Study/Series/SOP Instance UIDs with its pixel data as read
    (pydicom writes encapsulated data as it found it); ``copy`` is None where pydicom
    cannot write the file back.

    The corpora ship the same image in several transfer syntaxes under the same UIDs:
    sent as they are, every copy after the first would be a re-send of one instance (or a
    conflict) in one series, so one job. Fresh UIDs give each file its own series, so
    its own job and its own SR and KOS, built from its own patient and study attributes."""
    cases = []
    for corpus, root in CORPORA.items():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, force=True)
            except Exception:
                continue
            if "Rows" not in ds or not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                continue
            case = {"corpus": corpus, "file": path.name, "copy": None, "sop_instance_uid": None}
            cases.append(case)
            try:
                for _ in ds.iterall():  # every element parsed, so VRs left implicit come from the dictionary
                    pass
                if "TransferSyntaxUID" not in ds.file_meta:  # no file meta (ACR-NEMA): as pydicom read it
                    implicit, little = ds.original_encoding
                    ds.file_meta.TransferSyntaxUID = (
                        (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
                        if little
                        else ExplicitVRBigEndian
                    )
                ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                target = Path(out_dir) / f"{corpus}-{path.name}"
                ds.save_as(target, enforce_file_format=True)
            except Exception:
                continue
            case.update(copy=str(target), sop_instance_uid=str(ds.SOPInstanceUID))
    return cases


def _copies(out_dir: Path) -> list[dict]:
    """:func:`write_copies` in a process of its own: these files are deliberately broken,
    and pytest's warning filters would turn pydicom's complaints about them into errors."""
    code = (
        "import json, sys; from tests.test_corpus import write_copies; json.dump(write_copies(sys.argv[1]), sys.stdout)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out_dir)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _send(cases: list[dict], port: int) -> None:
    """C-STORE each copy as it is on disk (``status``: the response status, None where the
    node accepted no presentation context for it), one association per batch of files
    whose presentation contexts fit in one association."""
    pending = [c for c in cases if c["copy"]]
    while pending:
        ae, contexts, batch = AE(ae_title="CORPUS"), set(), []
        for case in pending:
            meta = pydicom.filereader.read_file_meta_info(case["copy"])
            context = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            if context in contexts or len(contexts) < MAX_CONTEXTS:
                contexts.add(context)
                batch.append(case)
        for sop_class, syntax in sorted(contexts):
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="RADPIPE")
        assert assoc.is_established
        try:
            for case in batch:
                try:
                    case["status"] = int(assoc.send_c_store(case["copy"]).get("Status", -1))
                except ValueError:  # no accepted presentation context for its SOP class and syntax
                    case["status"] = None
        finally:
            assoc.release()
        pending = [c for c in pending if c not in batch]


def test_every_shipped_image_gives_valid_results_or_a_named_failure(tmp_path, dcmtk, monkeypatch):
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # the bytes as on disk
    (tmp_path / "copies").mkdir()
    cases = _copies(tmp_path / "copies")
    port = free_port()
    write_pipeline(
        tmp_path / "pipelines",
        name="catch-all",
        match={"Rows": {"exists": True}},
        outputs=[{"sr": {"sop_class": "comprehensive3d"}}, {"kos": {"when": "always"}}],
    )
    config = node_config(tmp_path, node={"port": port})
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(config))
    journal = NodeConfig.model_validate(config).journal_location
    storage, log = tmp_path / "data", tmp_path / "node.log"
    node = serve(tmp_path / "radpipe.yaml", port, log)
    try:
        _send(cases, port)
        accepted = {c["sop_instance_uid"] for c in cases if c.get("status") == 0}
        assert len(accepted) > len(cases) / 2, "most files should be accepted"
        sql = (
            "SELECT i.sop_instance_uid, j.id, j.status, j.error FROM instances i JOIN jobs j ON j.batch_id = i.batch_id"
            " WHERE j.status IN ('done', 'failed')"
        )

        def finished() -> list[tuple] | None:
            rows = read_journal(journal, sql)
            return rows if {uid for uid, *_ in rows} >= accepted else None

        jobs = {uid: job for uid, *job in wait_for(finished, timeout=150, what="a job done or failed for each file")}
        assert echo_ok(port), "the node stopped answering C-ECHO"
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)

    results = read_journal(journal, "SELECT job_id, kind, path FROM results")
    with ThreadPoolExecutor(2) as pool:
        errors = dict(zip(results, pool.map(lambda r: dciodvfy_errors(Path(r[2])), results), strict=True))
    notes = [json.loads(p.read_text()) for p in (storage / "quarantine").glob("*/*.json")]
    refusals = {note["sop_instance_uid"]: note["reason"] for note in notes}

    print()  # the figures, per corpus (pytest -s shows them)
    for corpus in CORPORA:
        mine = [c for c in cases if c["corpus"] == corpus]
        refused = Counter(refusals.get(c["sop_instance_uid"], "?") for c in mine if c.get("status") not in (0, None))
        their_jobs = [jobs[c["sop_instance_uid"]] for c in mine if c["sop_instance_uid"] in jobs]
        failed = Counter(error.split(":")[0] for _, status, error in their_jobs if status == "failed")
        job_ids = {job_id for job_id, _, _ in their_jobs}
        written = Counter(kind for job_id, kind, _ in results if job_id in job_ids)
        print(
            f"{corpus}: {len(mine)} image files, {sum(not c['copy'] for c in mine)} not writable with fresh UIDs, "
            f"{sum(bool(c['copy']) and c.get('status') is None for c in mine)} not sent (no context accepted), "
            f"{sum(c.get('status') is not None for c in mine)} sent, refused at receipt {dict(refused)}, "
            f"{len(job_ids)} jobs, failed {dict(failed)}, {written['sr']} SRs, {written['kos']} KOSs, "
            f"{sum(len(e) for r, e in errors.items() if r[0] in job_ids)} dciodvfy errors"
        )
    assert {path: lines for (_, _, path), lines in errors.items() if lines} == {}
    assert all(refusals.get(c["sop_instance_uid"]) for c in cases if c.get("status") not in (0, None))
    named = re.compile(r"^[a-z]+(_[a-z]+)*: ")
    assert [error for _, status, error in jobs.values() if status == "failed" and not named.match(error)] == []
    done = {job_id for job_id, status, _ in jobs.values() if status == "done"}
    assert Counter(kind for job_id, kind, _ in results if job_id in done) == {"sr": len(done), "kos": len(done)}
    output = log.read_text()
    assert "Traceback" not in output, output[output.index("Traceback") - 1000 :][:4000]
