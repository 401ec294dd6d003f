"""The STOW-RS user agent (PS3.18 10.5): sends results to a DICOMweb destination, the
counterpart of ``scu.py`` for C-STORE, with the same interface to the dispatcher.

One HTTP connection (kept alive) carries a round's results, one POST per result, so
each result gets its own answer. The answer is read by its meaning (PS3.18 10.5.3):
a result is delivered on 2xx unless the Failed SOP Sequence names it; a failure reason
or HTTP status that says the same request can succeed later (out of resources, server
busy or failing, the network) is retried, one that says it never will (bad request,
unauthorized, unsupported media type, too large, a conflict) is dead-lettered at once.
"""

import json
import uuid
from collections.abc import Sequence
from enum import IntEnum
from types import TracebackType
from typing import Any

import httpx

from plugin.config import Destination, TLSConfig
from plugin.scu import DeliveryError, DicomFile, Timeouts, client_ssl_context

DICOM_JSON = "application/dicom+json"


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) values of a STOW-RS answer (PS3.18 10.5.3.1; the
    storage service's statuses, PS3.4 B.2.3)."""

    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


def is_transient(reason: int) -> bool:
    """The origin server may store the same instance later: it lacked resources or failed
    itself. Every other reason is about the instance, and repeats."""
    return 0xA700 <= reason <= 0xA7FF or reason in (FailureReason.PROCESSING_FAILURE, FailureReason.RESOURCE_LIMITATION)


def describe(reason: int) -> str:
    try:
        name = FailureReason(reason).name.lower().replace("_", " ")
    except ValueError:
        name = "unknown"
    return f"0x{reason:04X} ({name})"


# Statuses after which the same request can succeed: timeouts, rate limits, server errors.
TRANSIENT_HTTP = frozenset({408, 425, 429})

# JSON tags (PS3.18 F.2) of the answer's Failed SOP Sequence and its items.
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


def failure_reasons(answer: bytes, sop_instance_uid: str) -> list[int]:
    """The failure reasons a STOW-RS answer (DICOM JSON) gives for one instance; none when
    the answer names no failure for it or is not DICOM JSON."""
    try:
        dataset = json.loads(answer)
    except ValueError:
        return []
    if isinstance(dataset, list) and dataset:
        dataset = dataset[0]
    if not isinstance(dataset, dict):
        return []
    reasons = []
    for item in dataset.get(FAILED_SOP_SEQUENCE, {}).get("Value", []):
        uids = item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value", []) if isinstance(item, dict) else []
        values = item.get(FAILURE_REASON, {}).get("Value", []) if isinstance(item, dict) else []
        if sop_instance_uid in uids:
            reasons += [int(v) for v in values if isinstance(v, int)] or [FailureReason.PROCESSING_FAILURE]
    return reasons


def multipart_body(data: bytes) -> tuple[bytes, str]:
    """One DICOM file as a ``multipart/related; type="application/dicom"`` body; returns
    (body, Content-Type)."""
    boundary = uuid.uuid4().hex  # cannot occur by chance in the file
    body = b"".join(
        (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


class StowConnection:
    """An HTTP connection to the destination for one round; closed on leaving a ``with`` block."""

    def __init__(self, client: httpx.Client, url: str) -> None:
        self._client = client
        self._url = url
        self._up = True

    @property
    def is_established(self) -> bool:
        """False once the network failed: the rest of the round waits for the next."""
        return self._up

    def store(self, file: DicomFile) -> None:
        """POST one file; return only when the destination stored it."""
        body, content_type = multipart_body(file.path.read_bytes())
        headers = {"Content-Type": content_type, "Accept": DICOM_JSON}
        try:
            response = self._client.post(f"{self._url}/studies", content=body, headers=headers)
        except httpx.TransportError as e:
            self._up = False
            raise DeliveryError(f"{self._url}: {type(e).__name__}: {e or 'no answer'}") from e
        reasons = failure_reasons(response.content, file.sop_instance_uid)
        code = response.status_code
        answered = f"{self._url}: STOW-RS answered HTTP {code} {response.reason_phrase}"
        if reasons:
            permanent = not any(map(is_transient, reasons))
            raise DeliveryError(f"{answered}, failure reason {', '.join(map(describe, reasons))}", permanent)
        if 200 <= code < 300:
            return
        transient = code >= 500 or code in TRANSIENT_HTTP
        raise DeliveryError(answered, permanent=not transient)

    def __enter__(self) -> "StowConnection":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._client.close()


class StowClient:
    """Opens connections to one DICOMweb destination, with the configured timeouts, TLS and auth."""

    def __init__(self, destination: Destination, timeouts: Timeouts) -> None:
        if destination.url is None:
            raise ValueError("a DICOMweb destination needs a url")
        self.url = destination.url.rstrip("/")
        self.destination = destination
        self.timeouts = timeouts

    def __str__(self) -> str:
        return self.url

    def _auth(self) -> dict[str, Any]:
        """The client's auth arguments; secret files are read on every round, so a token
        renewed in its file is used from the next round on."""
        auth = self.destination.auth
        if auth is None:
            return {}
        if auth.bearer_token_file is not None:
            token = auth.bearer_token_file.read_text().strip()
            return {"headers": {"Authorization": f"Bearer {token}"}}
        assert auth.basic is not None  # the config allows exactly one of the two
        return {"auth": httpx.BasicAuth(auth.basic.user, auth.basic.password_file.read_text().strip())}

    def associate(self, files: Sequence[DicomFile]) -> StowConnection:
        """A connection for a round of ``files`` (opened by the first request)."""
        timeouts = self.timeouts
        client = httpx.Client(
            timeout=httpx.Timeout(
                connect=timeouts.connect, read=timeouts.dimse, write=timeouts.network, pool=timeouts.acse
            ),
            verify=client_ssl_context(self.destination.tls or TLSConfig(), check_hostname=True),
            **self._auth(),
        )
        return StowConnection(client, self.url)
