"""Scenario head-01: an ISU is SIGKILLed under a mounted volume.

Fails: isu2, with SIGKILL, after files were written and fsync'd.
Then: caches dropped, every file read back through the filesystem (reads
reconstruct from parity), a file written while degraded, isu2 restarted.
Must hold: every byte equal; the array goes UU_UU, then back to UUUUU by
resyncing only what isu2 missed; and the data written while it was away is
really on it (proved by then losing a different ISU and reading again).
"""
from __future__ import annotations

from scenario_support import drop_caches, sha256_of, state, wait_until, write_file


def test_isu_sigkill_degraded_reads_then_resync(head_lab):
    lab, api = head_lab
    mnt = lab.dir / "mnt" / "vol0"
    d = mnt / "s01"
    d.mkdir()
    files = {d / f"f{i}": write_file(d / f"f{i}", (i + 1) * 300_000, seed=i) for i in range(12)}
    assert state(api) == "UUUUU"

    lab.kill("isu2")
    drop_caches()
    for path, digest in files.items():
        assert sha256_of(path) == digest, path
    wait_until(lambda: state(api) == "UU_UU", 30, "array degraded")

    files[d / "degraded"] = write_file(d / "degraded", 3_000_000, seed=99)
    lab.restart_isu(2)
    # the member shows U as soon as it is in sync; the phase ends once its superblocks say so
    wait_until(lambda: state(api) == "UUUUU"
               and api.status()["array"]["progress"]["resync"]["state"] == "done", 60, "array resynced")
    st = api.status()["array"]
    # only the regions written while away were copied, not the whole member
    assert st["progress"]["resync"]["total"] < st["size"] // st["chunk_size"]

    # prove isu2 got what it missed: lose another member and read everything
    lab.kill("isu0")
    drop_caches()
    for path, digest in files.items():
        assert sha256_of(path) == digest, path
    lab.restart_isu(0)
    wait_until(lambda: state(api) == "UUUUU", 60, "array resynced after isu0")
