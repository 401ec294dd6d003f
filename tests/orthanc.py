"""A real Orthanc (Debian package ``orthanc``) on free loopback ports, for integration tests.

Each instance gets its own JSON config and storage folder, so it never touches the
packaged service's database in /var/lib/orthanc, and its ports are picked free, so a
running system service on 4242/8042 cannot collide with it.
"""

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc")  # the package installs into /usr/sbin
USER, PASSWORD = "radpipe-test", "radpipe-test"


def orthanc_binary() -> str | None:
    for candidate in ORTHANC_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def stop_packaged_service() -> None:
    """Stop Debian's ``orthanc`` service if it runs: installing the package may start it,
    and two Orthancs on one machine confuse anyone reading the logs (ports already differ)."""
    if shutil.which("service") is None:
        return
    status = subprocess.run(["service", "orthanc", "status"], capture_output=True, text=True, timeout=30)
    if status.returncode == 0:
        subprocess.run(["service", "orthanc", "stop"], capture_output=True, timeout=60)


class Orthanc:
    """One Orthanc process: ``start()``, REST helpers, ``stop()``."""

    def __init__(
        self, workdir: Path, http_port: int, dicom_port: int, aet: str, modalities: dict[str, dict[str, Any]]
    ) -> None:
        self.workdir = workdir
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.aet = aet
        self.modalities = modalities
        self.log_path = workdir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self._auth = f"Basic {token}"

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "db"
        return {
            "Name": "radpipe-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            # Each modality as {AET, Host, Port}: Orthanc C-STOREs to it on request.
            "DicomModalities": self.modalities,
            "DicomScuTimeout": 30,
            "StableAge": 1,
        }

    def start(self, timeout: float = 60) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc not installed: run `make test`, which installs the Debian package orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._process.returncode}:\n{self.log()}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        """Call the REST API; returns the decoded JSON answer or the raw bytes."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        request.add_header("Authorization", self._auth)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
            if response.headers.get_content_type() == "application/json":
                return json.loads(data)
            return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, payload: object) -> Any:
        return self.request("POST", path, json.dumps(payload).encode())

    def upload(self, path: Path) -> dict[str, Any]:
        """POST one DICOM file to ``/instances``; returns Orthanc's answer (IDs, status)."""
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")
