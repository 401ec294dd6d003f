"""DICOMweb: results sent by STOW-RS to Orthanc's DICOMweb plugin (Debian package
``orthanc-dicomweb``) through the same outbox as C-STORE, HTTP answers mapped to a retry
or a dead letter by their meaning; and radpipe's own STOW-RS endpoint, fed by Orthanc and
by a plain HTTP client, storing like C-STORE and refusing bad bodies whole."""

import glob
import io
import json
import re
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml

from plugin.app import Node
from plugin.config import ConfigError, Destination, DispatchSection, load_config
from plugin.multipart import ChunkedReader, LengthReader, MultipartError, TooLarge, read_parts
from plugin.outputs.sr import read_measurement_report
from plugin.stow import FailureReason, failure_reasons, is_transient
from tests.conftest import free_port, open_journal, results, storescu, wait_for, with_new_uids
from tests.orthanc import PASSWORD, USER, Orthanc, stop_packaged_service
from tests.test_dispatch import dispatching, queue_results

DICOMWEB_PLUGIN = "/usr/lib/orthanc/libOrthancDicomWeb.so*"  # where Debian's orthanc-dicomweb puts it


TOKEN = "radpipe-test-token"  # Orthanc's bearer token towards radpipe's STOW-RS endpoint


class DicomwebOrthanc(Orthanc):
    """Orthanc with its DICOMweb plugin at ``/dicom-web/`` (same basic auth as its REST API);
    ``radpipe_port``: radpipe's STOW-RS endpoint, known to it as DICOMweb server ``radpipe``."""

    def __init__(self, workdir: Path, radpipe_port: int | None = None) -> None:
        super().__init__(workdir, http_port=free_port(), dicom_port=free_port(), aet="ORTHANC", modalities={})
        self.radpipe_port = radpipe_port

    def config(self) -> dict[str, Any]:
        plugins = sorted(glob.glob(DICOMWEB_PLUGIN))
        if not plugins:
            pytest.fail("orthanc-dicomweb not installed: run `make test`, which installs it")
        servers = {}
        if self.radpipe_port is not None:
            url = f"http://127.0.0.1:{self.radpipe_port}/"
            servers["radpipe"] = {"Url": url, "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}
        dicomweb = {"Enable": True, "Root": "/dicom-web/", "Servers": servers}
        return {**super().config(), "Plugins": plugins[-1:], "DicomWeb": dicomweb}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def instances_with(self, sop_instance_uid: str) -> list[str]:
        return self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebOrthanc]:
    stop_packaged_service()
    server = DicomwebOrthanc(tmp_path_factory.mktemp("orthanc-dicomweb"), radpipe_port=free_port())
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
    server = DicomwebOrthanc(tmp_path / "orthanc")
    [path] = demo_study["Demo chest CT, no nodules"][:1]
    journal = open_journal(tmp_path)
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
    journal = open_journal(tmp_path)
    queue_results(journal, [path], list(destinations))
    try:
        with dispatching(journal, destinations, DispatchSection(backoff_seconds=0.1)):
            dead = wait_for(
                lambda: len(journal.deliveries(status="dead")) == 2 and journal.deliveries(status="dead"),
                timeout=20,
                what="two dead letters",
            )
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


# -- radpipe's STOW-RS endpoint -------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "orthanc.token"
    path.write_text(TOKEN + "\n")
    return path


def multipart(*parts: tuple[str | None, bytes], boundary: str = "radpipe-test-boundary") -> bytes:
    """A multipart body of (Content-Type or None, content) parts."""
    chunks = []
    for content_type, content in parts:
        headers = f"Content-Type: {content_type}\r\n" if content_type else ""
        chunks.append(f"--{boundary}\r\n{headers}\r\n".encode() + content + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=radpipe-test-boundary'


def stow(
    port: int,
    body: bytes | Iterator[bytes],
    content_type: str = STOW_TYPE,
    token: str | None = TOKEN,
    path: str = "/studies",
) -> httpx.Response:
    """POST a body to radpipe's endpoint (an iterator is sent chunked)."""
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"http://127.0.0.1:{port}{path}", content=body, headers=headers, timeout=60)


def test_a_study_that_orthanc_uploads_by_stow_rs_comes_back_with_its_sr(
    orthanc: DicomwebOrthanc,
    start_node: Callable[..., Node],
    demo_study: dict[str, list[Path]],
    password_file: Path,
    token_file: Path,
    tmp_path: Path,
) -> None:
    """Orthanc sends the study to radpipe with its DICOMweb client (chunked multipart
    bodies, bearer token); radpipe stores and journals it as it would C-STOREd
    instances, runs the pipeline, and its SR comes back into the study by STOW-RS."""
    series = with_new_uids(demo_study["Demo chest CT, nodules"], tmp_path / "study")  # a study Orthanc holds alone
    [study_id] = {orthanc.upload(p)["ParentStudy"] for p in series}
    node = start_node(
        node={"dicomweb": {"port": orthanc.radpipe_port, "tokens": {"orthanc": str(token_file)}}},
        destinations={"web": web_destination(orthanc.url, password_file)},
    )
    orthanc.post("/dicom-web/servers/radpipe/stow", {"Resources": [study_id]})

    sop_uids = {_sop_uid(p) for p in series}
    for uid in sop_uids:
        instance = node.journal.instance(uid)
        assert instance is not None and instance.calling_ae == "orthanc"
        assert Path(instance.path).is_file()
    [delivery] = wait_for(lambda: node.journal.deliveries(status="delivered"), what="the SR delivered")
    [result] = node.journal.results(delivery.job_id)
    [instance_id] = orthanc.instances_with(result.sop_instance_uid)
    assert orthanc.get(f"/instances/{instance_id}")["ParentSeries"] in orthanc.get(f"/studies/{study_id}")["Series"]
    [finding] = read_measurement_report(pydicom.dcmread(result.path))
    assert finding.present and set(finding.source_sop_instance_uids) == sop_uids
    received = node.metrics.registry.get_sample_value("radpipe_instances_received_total", {"calling_ae": "orthanc"})
    assert received == len(series)


def test_an_upload_is_answered_200_only_with_every_instance_journaled(
    start_node: Callable[..., Node], demo_study: dict[str, list[Path]], token_file: Path
) -> None:
    series = demo_study["Demo chest CT, no nodules"]
    node = start_node(node={"dicomweb": {"port": free_port(), "tokens": {"uploader": str(token_file)}}})
    assert node.stow_server is not None
    response = stow(node.stow_server.port, multipart(*[("application/dicom", p.read_bytes()) for p in series]))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(response.json())
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [_sop_uid(p) for p in series]
    assert "FailedSOPSequence" not in answer
    for path in series:  # journaled before the answer, the file as C-STORE would have spooled it
        instance = node.journal.instance(_sop_uid(path))
        assert instance is not None and instance.calling_ae == "uploader"
        stored = pydicom.dcmread(instance.path)
        assert stored.PixelData == pydicom.dcmread(path).PixelData
    # the same upload again changes nothing: already stored, answered success
    again = stow(node.stow_server.port, multipart(("application/dicom", series[0].read_bytes())))
    assert again.status_code == 200
    wait_for(lambda: [j for j in node.journal.jobs() if j.status == "done"], what="the job done")
    assert len(results(node.results_dir)) == 1


def test_bad_requests_get_a_4xx_and_nothing_is_stored(
    start_node: Callable[..., Node], demo_study: dict[str, list[Path]], token_file: Path, tmp_path: Path
) -> None:
    """Wrong content type, malformed multipart, a part that is not DICOM, an oversize body
    (by Content-Length, or chunked), no token: each refused whole with its 4xx and a message,
    while earlier parts of the same body were valid; then spool and journal are still empty."""
    series = demo_study["Demo chest CT, nodules"]
    one, two = series[0].read_bytes(), series[1].read_bytes()
    assert len(one) + len(two) < 2**21 < sum(p.stat().st_size for p in series)  # max_body_mb: 2
    node = start_node(
        node={"dicomweb": {"port": free_port(), "tokens": {"uploader": str(token_file)}, "max_body_mb": 2}}
    )
    assert node.stow_server is not None
    port = node.stow_server.port
    valid = multipart(("application/dicom", one), ("application/dicom", two))
    whole_series = multipart(*[("application/dicom", p.read_bytes()) for p in series])
    chunked = iter([whole_series[i : i + 50000] for i in range(0, len(whole_series), 50000)])
    cases = {
        "single part, not multipart": (415, stow(port, one, content_type="application/dicom")),
        "multipart of JSON": (415, stow(port, valid, content_type=STOW_TYPE.replace("dicom", "json"))),
        "a part of another type": (415, stow(port, multipart(("application/dicom", one), ("image/jpeg", b"\xff\xd8")))),
        "no boundary parameter": (400, stow(port, valid, content_type='multipart/related; type="application/dicom"')),
        "boundary never found": (400, stow(port, valid.replace(b"radpipe-test-boundary", b"other-boundary-xyz"))),
        "cut off before the close delimiter": (400, stow(port, valid[: len(one) + 200])),
        "second part is not DICOM": (400, stow(port, multipart(("application/dicom", one), (None, b"not DICOM")))),
        "second part's file meta cut": (400, stow(port, multipart(("application/dicom", one), (None, two[:140])))),
        "over max_body_mb": (413, stow(port, whole_series)),
        "over max_body_mb, chunked": (413, stow(port, chunked)),
        "no token": (401, stow(port, valid, token=None)),
        "unknown token": (401, stow(port, valid, token="guessed")),
        "not the STOW-RS path": (404, stow(port, valid, path="/instances")),
    }  # fmt: skip
    for case, (status, response) in cases.items():
        assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
        assert response.text, f"{case}: the answer says why"
    assert "WWW-Authenticate" in cases["no token"][1].headers
    assert [p for p in (tmp_path / "data" / "spool").rglob("*") if p.is_file()] == []
    assert all(node.journal.instance(_sop_uid(p)) is None for p in series[:2])
    assert node.journal.queue_depths()["assembly"] == 0
    assert list((tmp_path / "data" / "quarantine").rglob("*.dcm")) == []
    assert stow(port, valid).status_code == 200  # the same node, a good body: stored
    assert all(node.journal.instance(_sop_uid(p)) is not None for p in series[:2])
    refused = node.metrics.registry.get_sample_value
    assert refused("radpipe_stow_requests_total", {"status": "415"}) == 3
    assert refused("radpipe_stow_requests_total", {"status": "200"}) == 1


def test_radpipes_own_failure_answers_are_retried_or_dead_lettered_by_their_reason(
    start_node: Callable[..., Node], demo_study: dict[str, list[Path]], tmp_path: Path
) -> None:
    """Two radpipe endpoints as destinations: one whose disk is below its floor answers
    503 with reason 0xA700 (retried), one that holds the same SOP Instance UID with other
    content answers 409 with 0xA900 (dead-lettered after that one try)."""
    original = demo_study["Demo chest CT, nodules"][0]
    below_floor = {"dir": str(tmp_path / "full"), "min_free_mb": 2**40}
    full = start_node(node={"dicomweb": {"port": free_port()}}, storage=below_floor)
    holding = start_node(node={"dicomweb": {"port": free_port()}}, storage={"dir": str(tmp_path / "holding")})
    assert full.stow_server is not None and holding.stow_server is not None
    assert (
        stow(holding.stow_server.port, multipart(("application/dicom", original.read_bytes())), token=None).status_code
        == 200
    )
    changed = pydicom.dcmread(original)
    changed.InstanceNumber = int(changed.InstanceNumber) + 100
    changed.save_as(tmp_path / "changed.dcm")
    destinations = {
        "full": Destination(url=f"http://127.0.0.1:{full.stow_server.port}"),
        "holding": Destination(url=f"http://127.0.0.1:{holding.stow_server.port}"),
    }
    journal = open_journal(tmp_path)
    job_id = queue_results(journal, [tmp_path / "changed.dcm"], list(destinations))
    try:
        with dispatching(journal, destinations, DispatchSection(backoff_seconds=60)):
            tried = wait_for(
                lambda: all(d.attempts for d in journal.deliveries(job_id)) and journal.deliveries(job_id),
                timeout=20,
                what="both tried",
            )
        outcome = {d.destination: (d.status, d.attempts, d.last_error or "") for d in tried}
        assert outcome["full"][:2] == ("pending", 1)
        assert "HTTP 503" in outcome["full"][2] and "0xA700 (out of resources)" in outcome["full"][2]
        assert outcome["holding"][:2] == ("dead", 1)
        assert "HTTP 409" in outcome["holding"][2] and "0xA900" in outcome["holding"][2]
    finally:
        journal.close()


@pytest.fixture(scope="module")
def https_pki(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pki`` plus a server certificate for 127.0.0.1 (HTTPS clients check the address)."""
    d = tmp_path_factory.mktemp("https")
    for command in (
        f"req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 "
        f"-keyout {d}/web.key -out {d}/web.csr",
        f"x509 -req -in {d}/web.csr -CA {pki}/ca.crt -CAkey {pki}/ca.key -CAcreateserial -days 2 "
        f"-copy_extensions copyall -out {d}/web.crt",
    ):
        subprocess.run(["openssl", *command.split()], check=True, capture_output=True)
    return d


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
    start_node: Callable[..., Node], demo_study: dict[str, list[Path]], pki: Path, https_pki: Path, tmp_path: Path
) -> None:
    """Without tokens, client certificates are the allow-list: one signed by ``ca`` is
    served, a rogue one or none gets no HTTP exchange at all. radpipe's own STOW-RS client
    sends to it over HTTPS, checking the server's address and presenting its certificate."""
    tls = {"cert": str(https_pki / "web.crt"), "key": str(https_pki / "web.key"), "ca": str(pki / "ca.crt"),
           "require_client_cert": True}  # fmt: skip
    node = start_node(node={"dicomweb": {"port": free_port(), "tls": tls}})
    assert node.stow_server is not None
    url = f"https://127.0.0.1:{node.stow_server.port}"
    first, second = demo_study["Demo chest CT, nodules"][:2]
    body = multipart(("application/dicom", first.read_bytes()))

    def post(client_cert: str | None) -> httpx.Response:
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        if client_cert is not None:
            context.load_cert_chain(pki / f"{client_cert}.crt", pki / f"{client_cert}.key")
        headers = {"Content-Type": STOW_TYPE}
        return httpx.post(f"{url}/studies", content=body, headers=headers, verify=context, timeout=30)

    for refused in ("rogue", None):
        with pytest.raises(httpx.TransportError):
            post(refused)
    assert node.journal.instance(_sop_uid(first)) is None
    assert post("client").status_code == 200
    assert node.journal.instance(_sop_uid(first)) is not None

    client_tls = {"ca": pki / "ca.crt", "cert": pki / "client.crt", "key": pki / "client.key"}
    destinations = {"https": Destination(url=url, tls=client_tls)}
    journal = open_journal(tmp_path)
    job_id = queue_results(journal, [second], ["https"])
    try:
        with dispatching(journal, destinations, DispatchSection(backoff_seconds=60)):
            wait_for(lambda: journal.deliveries(job_id, status="delivered"), timeout=20, what="delivered over HTTPS")
    finally:
        journal.close()
    assert node.journal.instance(_sop_uid(second)) is not None


class Trickle:
    """A body that arrives a few bytes at a time, so that every delimiter and header
    block is split across reads somewhere."""

    def __init__(self, data: bytes, sizes: tuple[int, ...] = (1, 7, 3, 64, 2)) -> None:
        self._data, self._sizes, self._reads = data, sizes, 0

    def read(self, size: int, /) -> bytes:
        n = min(size, self._sizes[self._reads % len(self._sizes)])
        self._reads += 1
        chunk, self._data = self._data[:n], self._data[n:]
        return chunk


def test_multipart_parts_survive_any_split_and_rfc_2046_extras(tmp_path: Path) -> None:
    """Preamble, transport padding, a part without headers, CRLF inside content, an epilogue;
    read through a trickle and through the chunked transfer coding."""
    contents = [b"first\r\n--not-the-boundary\r\n", b"", b"x" * 5000]
    dicom = b"Content-Type: application/dicom\r\n"
    body = b"".join(
        (
            b"preamble to ignore\r\n--b1\r\n" + dicom + b"\r\n" + contents[0],
            b"\r\n--b1  \t\r\n\r\n" + contents[1],  # padding after the delimiter, no headers
            b"\r\n--b1\r\n" + dicom + b"\r\n" + contents[2],
            b"\r\n--b1--\r\nepilogue",
        )
    )
    chunks = [body[i : i + 999] for i in range(0, len(body), 999)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    readers = (LengthReader(Trickle(body), len(body)), ChunkedReader(io.BufferedReader(io.BytesIO(chunked))))
    for stream in readers:
        with (tmp_path / "parts").open("w+b") as parts_file:
            parts = read_parts(stream, "b1", parts_file, max_part_bytes=5000, max_body_bytes=len(body))
            assert [part.read(parts_file) for part in parts] == contents
            assert [part.content_type for part in parts] == ["application/dicom", None, "application/dicom"]
    for bad, error in (
        (body[:-30], "ended inside the part"),  # no close delimiter
        (body.replace(b"--b1  \t", b"--b1 x"), "other characters than white space"),
        (body.replace(b"x" * 5000, b"x" * 5001), "part longer than 5000 bytes"),
    ):
        with (tmp_path / "parts").open("w+b") as parts_file, pytest.raises(MultipartError, match=error):
            read_parts(LengthReader(Trickle(bad), len(bad)), "b1", parts_file, 5000, len(body) + 1)
    with (tmp_path / "parts").open("w+b") as parts_file, pytest.raises(TooLarge, match="body is larger"):
        read_parts(LengthReader(io.BytesIO(body), len(body)), "b1", parts_file, 5000, len(body) - 1)
