"""Who may talk to the node: AE allow-list, called-AE check, DICOM TLS (mutual), and no
patient identity in any log line."""

import logging
import ssl
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from plugin.config import Destination, TLSConfig
from plugin.scu import DicomFile, StoreSCU, Timeouts
from tests.conftest import DEID_HUMANS, free_port, results, storescu, wait_for, write_pipeline


def _echo(port: int, calling: str = "ECHOSCU", called: str = "RADPIPE", tls=None) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)
    ok = assoc.is_established and assoc.send_c_echo().Status == 0
    if assoc.is_established:
        assoc.release()
    return ok


def _client(pki: Path, name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    context.check_hostname = False
    if name:
        context.load_cert_chain(pki / f"{name}.crt", pki / f"{name}.key")
    return context


def test_calling_ae_allow_list_and_called_ae_check(start_node):
    node = start_node(node={"allowed_calling_aets": ["MODALITY1"]})
    assert _echo(node.port, calling="MODALITY1")
    assert not _echo(node.port, calling="STRANGER")
    assert not _echo(node.port, calling="MODALITY1", called="SOMEONE")
    sample = node.metrics.registry.get_sample_value
    assert sample("radpipe_associations_rejected_total", {"reason": "calling_ae_not_allowed"}) == 1
    assert sample("radpipe_associations_rejected_total", {"reason": "called_ae_mismatch"}) == 1


def test_tls_only_refuses_plain_and_wrong_client_certificates(start_node, pki, demo_study):
    tls = {
        "cert": str(pki / "server.crt"),
        "key": str(pki / "server.key"),
        "ca": str(pki / "ca.crt"),
        "require_client_cert": True,
    }
    node = start_node(node={"tls": tls})
    assert _echo(node.port, tls=(_client(pki, "client"), None))
    assert not _echo(node.port)  # plain DICOM on the TLS port
    assert not _echo(node.port, tls=(_client(pki, "rogue"), None))  # certificate from another CA
    assert not _echo(node.port, tls=(_client(pki, None), None))  # no client certificate at all

    # The SCU side: results go to a TLS destination with this node's client certificate.
    destination = Destination(
        ae_title="RADPIPE",
        host="127.0.0.1",
        port=node.port,
        tls=TLSConfig(cert=pki / "client.crt", key=pki / "client.key", ca=pki / "ca.crt"),
    )
    file = DicomFile.read(demo_study["Demo chest CT, nodules"][0])
    with StoreSCU(destination, "TLSSCU", Timeouts(connect=10, acse=10, dimse=10, network=10)).associate([file]) as tls:
        tls.store(file)
    uid = str(pydicom.dcmread(demo_study["Demo chest CT, nodules"][0]).SOPInstanceUID)
    assert node.journal.instance(uid) is not None


def test_tls_with_a_plain_port_beside_it(start_node, pki):
    plain = free_port()
    node = start_node(
        node={"tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")}, "plain_port": plain}
    )
    assert _echo(node.port, tls=(_client(pki, None), None))
    assert _echo(plain)


def test_no_patient_identity_in_any_log_line(start_node, tmp_path, caplog, dcmtk):
    caplog.set_level(logging.DEBUG)  # every level of every logger, pynetdicom's and highdicom's included
    write_pipeline(tmp_path / "pipelines", match={"Modality": "CT"})  # the real CT too, unlike the shipped demo
    node = start_node()
    source = pydicom.dcmread(DEID_HUMANS / "ctbrain1.dcm")
    assert storescu(node.port, DEID_HUMANS / "ctbrain1.dcm", options=("-xy",)).returncode == 0
    wait_for(lambda: results(node.results_dir), what="the SR")
    ae = AE(ae_title="LOGTEST")
    meta = pydicom.filereader.read_file_meta_info(DEID_HUMANS / "ctbrain2.dcm")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RADPIPE")
    try:
        assoc.send_c_store(DEID_HUMANS / "ctbrain2.dcm")  # refused as a conflicting duplicate: logged
    finally:
        assoc.release()
    text = caplog.text
    assert "refused (duplicate_conflict)" in text and "job 1" in text
    secrets = [str(source.PatientName), str(source.PatientID), str(source.get("PatientBirthDate", None))]
    for part in [*str(source.PatientName).split("^"), *secrets]:
        if len(part) >= 4:
            assert part not in text, f"patient attribute leaked into the log: {part!r}"
