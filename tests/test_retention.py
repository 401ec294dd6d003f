"""Retention's sweep of files no journal row names, on both journal back ends: what a
failure leaves in the storage goes once past the grace period (an instance into the
quarantine, never deleted), nothing journaled or recent does (also when the folder is
seen under another path), and a file written again since it was found old is kept."""

import time

from plugin.journal import InstanceRecord, JobSpec, Journal
from plugin.quarantine import Quarantine
from plugin.retention import Retention, remove_unchanged
from plugin.spool import Spool, write_atomically, write_durably
from tests.test_journal import location  # noqa: F401 (fixture: SQLite file or PostgreSQL database)

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_files_no_row_names_are_removed_once_past_the_grace_period(location, tmp_path):  # noqa: F811
    journal = Journal(location)
    spool, results_dir = Spool(tmp_path / "spool"), tmp_path / "results"
    quarantine = Quarantine(tmp_path / "quarantine")
    retention = Retention(journal, spool, results_dir, 0, quarantine)
    kept = spool.store("1.2", "1.2.3", "1.2.3.1", b"kept")
    journal.record_instance(InstanceRecord("1.2.3.1", CT, "1.2", "1.2.3", str(kept), 4, "CT1", 100.0))
    unjournaled = spool.store("1.2", "1.2.3", "1.2.3.2", b"its row never committed (0xA700)")
    partial = kept.with_name(".1.2.3.3.dcm.0123abcd.part")
    partial.write_bytes(b"a write cut short")
    result = results_dir / "1.2" / "9.1.dcm"
    write_durably(result, b"a finished job's SR")
    [series] = journal.pending_series()
    journal.create_batches("1.2", [(series, [JobSpec("demo", "1", "f" * 64, 0)])], [])
    assert journal.complete_job(journal.claim_job().id, [("sr", str(result), "9.1")], [])
    unfinished = results_dir / "1.2" / "9.2.dcm"
    write_durably(unfinished, b"the SR of a job whose node died before its finish")
    time.sleep(0.05)  # file times follow the kernel's coarse clock
    cutoff = time.time()
    time.sleep(0.05)
    fresh = spool.store("1.2", "1.2.4", "1.2.4.1", b"being received: no row yet")

    assert sorted(retention.sweep(cutoff)) == sorted([unjournaled, partial, unfinished])
    assert kept.read_bytes() == b"kept" and result.is_file() and fresh.is_file()
    # an instance is never deleted (its storage folder may have been put under another journal)
    [orphan] = (tmp_path / "quarantine" / "orphan").glob("*.dcm")
    assert orphan.read_bytes() == b"its row never committed (0xA700)"
    assert '"sop_instance_uid": "1.2.3.2"' in orphan.with_suffix(".json").read_text()
    assert retention.sweep(cutoff) == []
    mount = tmp_path.with_name(f"{tmp_path.name}-elsewhere")  # the shared folder as another node sees it
    mount.symlink_to(tmp_path)
    assert Retention(journal, Spool(mount / "spool"), mount / "results", 0, quarantine).sweep(cutoff) == []
    assert retention.sweep(time.time() + 1) == [fresh]  # once it is past the grace period too
    left = [p.name for folder in (spool.root, results_dir) for p in folder.rglob("*") if p.is_file()]
    assert sorted(left) == ["1.2.3.1.dcm", "9.1.dcm"]
    journal.close()


def test_a_file_written_again_since_it_was_found_old_is_kept(tmp_path):
    path = Spool(tmp_path).store("1.2", "1.2.3", "1.2.3.1", b"an orphan")
    seen = path.lstat()
    write_atomically(path, b"received again", fsync=False)  # a receipt's new file, renamed into place
    assert not remove_unchanged(path, seen)
    assert path.read_bytes() == b"received again" and list(path.parent.iterdir()) == [path]
    assert remove_unchanged(path, path.lstat()) and list(path.parent.iterdir()) == []
