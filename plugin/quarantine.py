"""Quarantine: what the node refuses or cannot process is kept, never dropped.

Each item is ``<storage>/quarantine/<reason>/<time>-<id>.dcm`` (the bytes as received)
with a ``.json`` beside it saying why: the reason (a failure category), the detail, the
SOP Instance UID and where it came from (calling AE, or the job). Nothing in the record
is a patient attribute.
"""

import json
import shutil
import time
import uuid
from pathlib import Path

from plugin.spool import write_durably


class Quarantine:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _target(self, reason: str) -> Path:
        return self.root / reason / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.dcm"

    def _describe(self, target: Path, reason: str, detail: str, source: str, sop_instance_uid: str) -> None:
        note = {
            "reason": reason,
            "detail": detail,
            "sop_instance_uid": sop_instance_uid,
            "source": source,
            "time": time.time(),
        }
        write_durably(target.with_suffix(".json"), json.dumps(note, indent=2).encode())

    def keep_bytes(self, data: bytes, reason: str, detail: str, source: str, sop_instance_uid: str) -> Path:
        target = self._target(reason)
        write_durably(target, data)
        self._describe(target, reason, detail, source, sop_instance_uid)
        return target

    def keep_file(
        self, path: Path, reason: str, detail: str, source: str, sop_instance_uid: str, move: bool = False
    ) -> Path:
        """Copy a stored instance here (the spool copy stays: the journal refers to it), or
        with ``move`` move it here (a rename: the quarantine is in the same storage folder)."""
        target = self._target(reason)
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            path.rename(target)
        else:
            shutil.copyfile(path, target)
        self._describe(target, reason, detail, source, sop_instance_uid)
        return target

    def count(self, reason: str | None = None) -> int:
        pattern = f"{reason}/*.dcm" if reason else "*/*.dcm"
        return len(list(self.root.glob(pattern)))
