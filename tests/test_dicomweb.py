"""DICOMweb: results sent by STOW-RS to Orthanc's DICOMweb plugin (Debian package
``orthanc-dicomweb``) through the same outbox as C-STORE, and HTTP answers mapped to a
retry or a dead letter by their meaning."""

import glob
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from plugin.app import Node
from plugin.config import ConfigError, Destination, DispatchSection, load_config
from plugin.journal import Journal
from plugin.stow import FailureReason, failure_reasons, is_transient
from tests.conftest import free_port, storescu, wait_for
from tests.orthanc import PASSWORD, USER, Orthanc, stop_packaged_service
from tests.test_dispatch import dispatching, queue_results

DICOMWEB_PLUGIN = "/usr/lib/orthanc/libOrthancDicomWeb.so*"  # where Debian's orthanc-dicomweb puts it


class DicomwebOrthanc(Orthanc):
    """Orthanc with its DICOMweb plugin at ``/dicom-web/`` (same basic auth as its REST API)."""

    def config(self) -> dict[str, Any]:
        plugins = sorted(glob.glob(DICOMWEB_PLUGIN))
        if not plugins:
            pytest.fail("orthanc-dicomweb not installed: run `make test`, which installs it")
        return {**super().config(), "Plugins": plugins[-1:], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def instances_with(self, sop_instance_uid: str) -> list[str]:
        return self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})


def _orthanc(tmp_path: Path) -> DicomwebOrthanc:
    return DicomwebOrthanc(tmp_path, http_port=free_port(), dicom_port=free_port(), aet="ORTHANC", modalities={})


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebOrthanc]:
    stop_packaged_service()
    server = _orthanc(tmp_path_factory.mktemp("orthanc-dicomweb"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "orthanc.password"
    path.write_text(PASSWORD + "\n")
    return path


def web_destination(url: str, password_file: Path, user: str = USER) -> dict[str, Any]:
    return {"url": url, "auth": {"basic": {"user": user, "password_file": str(password_file)}}}


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_sr_sent_by_stow_rs_appears_in_the_study(
    orthanc: DicomwebOrthanc,
    start_node: Callable[..., Node],
    demo_study: dict[str, list[Path]],
    password_file: Path,
    dcmtk: None,
) -> None:
    series = demo_study["Demo chest CT, nodules"]
    [study_id] = {orthanc.upload(p)["ParentStudy"] for p in series}
    node = start_node(destinations={"web": web_destination(orthanc.url, password_file)})
    assert storescu(node.port, *series).returncode == 0

    [delivery] = wait_for(lambda: node.journal.deliveries(status="delivered"), what="the SR delivered")
    assert delivery.destination == "web" and delivery.attempts == 1
    [result] = node.journal.results(delivery.job_id)
    [instance_id] = orthanc.instances_with(result.sop_instance_uid)
    assert orthanc.get(f"/instances/{instance_id}")["ParentSeries"] in orthanc.get(f"/studies/{study_id}")["Series"]
    stored = pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{instance_id}/file")))
    assert stored.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert stored.StudyInstanceUID == pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID
    assert Path(result.path).read_bytes() == orthanc.request("GET", f"/instances/{instance_id}/file")
    sample = node.metrics.registry.get_sample_value
    assert sample("radpipe_results_delivered_total", {"destination": "web"}) == 1
    assert sample("radpipe_dispatch_failures_total", {"destination": "web"}) == 0


def test_orthanc_down_is_retried_and_the_result_delivered_once(
    tmp_path: Path, demo_study: dict[str, list[Path]], password_file: Path
) -> None:
    """Orthanc is not running: each try fails to connect and is journaled with its backoff;
    once Orthanc is up the next try delivers, and the result is in Orthanc once."""
    server = _orthanc(tmp_path / "orthanc")
    [path] = demo_study["Demo chest CT, no nodules"][:1]
    journal = Journal(tmp_path / "journal.sqlite")
    job_id = queue_results(journal, [path], ["web"])
    destinations = {"web": Destination.model_validate(web_destination(server.url, password_file))}
    policy = DispatchSection(backoff_seconds=0.2, max_backoff_seconds=0.5)
    try:
        with dispatching(journal, destinations, policy) as metrics:
            [down] = wait_for(
                lambda: [d for d in journal.deliveries(job_id) if d.attempts >= 2], timeout=20, what="two failed tries"
            )
            assert down.status == "pending" and "ConnectError" in (down.last_error or "")
            server.start()
            [delivery] = wait_for(lambda: journal.deliveries(job_id, status="delivered"), timeout=30, what="delivery")
            failures = metrics.registry.get_sample_value("radpipe_dispatch_failures_total", {"destination": "web"})
            assert failures == delivery.attempts - 1 >= 2
            time.sleep(1)  # more than the longest backoff: a second send would have happened by now
            assert metrics.registry.get_sample_value("radpipe_results_delivered_total", {"destination": "web"}) == 1
        assert len(server.instances_with(_sop_uid(path))) == 1
        assert journal.due_deliveries(time.time() + 3600) == []
    finally:
        server.stop()
        journal.close()


def test_answers_that_cannot_change_are_dead_lettered_at_once(
    orthanc: DicomwebOrthanc, tmp_path: Path, demo_study: dict[str, list[Path]], password_file: Path
) -> None:
    """401 (wrong password) and 404 (no DICOMweb service at that URL): one try each, then
    the dead letter, with the answer in the journal."""
    [path] = demo_study["Demo chest CT, no nodules"][:1]
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password")
    destinations = {
        "unauthorized": Destination.model_validate(web_destination(orthanc.url, wrong)),
        "nowhere": Destination.model_validate(web_destination(orthanc.url + "-nowhere", password_file)),
    }
    journal = Journal(tmp_path / "journal.sqlite")
    queue_results(journal, [path], list(destinations))
    try:
        with dispatching(journal, destinations, DispatchSection(backoff_seconds=0.1)):
            dead = wait_for(lambda: len(journal.deliveries(status="dead")) == 2 and journal.deliveries(status="dead"),
                            timeout=20, what="two dead letters")  # fmt: skip
        assert [d.attempts for d in dead] == [1, 1]
        errors = {d.destination: d.last_error or "" for d in dead}
        assert "HTTP 401" in errors["unauthorized"]
        assert "HTTP 404" in errors["nowhere"]
    finally:
        journal.close()


@pytest.mark.parametrize(
    ("reason", "transient"),
    [
        (FailureReason.OUT_OF_RESOURCES, True),
        (0xA7FF, True),
        (FailureReason.PROCESSING_FAILURE, True),
        (FailureReason.RESOURCE_LIMITATION, True),
        (FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS, False),
        (FailureReason.CANNOT_UNDERSTAND, False),
        (FailureReason.SOP_CLASS_NOT_SUPPORTED, False),
        (FailureReason.NOT_AUTHORIZED, False),
        (FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED, False),
    ],
)
def test_failure_reasons_are_read_per_instance(reason: int, transient: bool) -> None:
    """A Failed SOP Sequence item counts for the instance it names only; its reason says retry or not."""

    def item(uid: str, code: int) -> dict:
        return {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [code]}}

    sequence = [item("1.2.3", reason), item("1.2.4", FailureReason.CANNOT_UNDERSTAND)]
    answer = json.dumps({"00081198": {"vr": "SQ", "Value": sequence}})
    assert failure_reasons(answer.encode(), "1.2.3") == [reason]
    assert failure_reasons(answer.encode(), "1.2.5") == []
    assert is_transient(reason) is transient


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ({"url": "http://pacs/dicom-web", "ae_title": "PACS"}, "not both"),
        ({"ae_title": "PACS", "host": "pacs"}, "give ae_title, host and port"),
        ({"ae_title": "PACS", "host": "pacs", "port": 104, "auth": {"bearer_token_file": "t"}}, "auth applies"),
        ({"url": "http://pacs", "auth": {"bearer_token_file": "t", "basic": {"user": "u", "password_file": "p"}}},
         "one of bearer_token_file or basic"),
        ({"url": "ftp://pacs/dicom-web"}, "should match pattern"),
    ],
)  # fmt: skip
def test_a_destination_is_one_form_or_an_error_naming_it(tmp_path: Path, destination: dict, message: str) -> None:
    config = tmp_path / "radpipe.yaml"
    config.write_text(yaml.safe_dump({"destinations": {"web": destination}}))
    with pytest.raises(ConfigError, match=message) as error:
        load_config(config, environ={})
    assert re.match(rf"{re.escape(str(config))}:[23]:\d+: destinations\.web", str(error.value))  # file:line: key


def test_secret_files_are_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    config = tmp_path / "radpipe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"dicomweb": {"port": 8080, "tokens": {"uploader": "uploader.token"}}},
                "destinations": {"web": {"url": "https://pacs/dicom-web", "auth": {"bearer_token_file": "web.token"}}},
            }
        )
    )
    loaded = load_config(config, environ={})
    assert loaded.node.dicomweb.tokens == {"uploader": tmp_path / "uploader.token"}
    auth = loaded.destinations["web"].auth
    assert auth is not None and auth.bearer_token_file == tmp_path / "web.token"
