"""Scenario head-08: backups scheduled in the head configuration.

Does: add a backup of vol0 every 10 s to a directory in head.json, restart
the head, wait.
Must hold: without anyone asking, two backups run (the second incremental),
each leaves a verified manifest whose snapshot is the one kept; the head's
jobs list shows them done.
"""
from __future__ import annotations

import json

from opie.head import config as head_config
from opie.head.backup import target_id
from scenario_support import state, wait_until, write_file


def test_scheduled_backups_run_by_themselves(head_lab, tmp_path):
    lab, api = head_lab
    target = tmp_path / "scheduled"
    target.mkdir()
    home = lab.dir / "head"
    cfg = head_config.load(home)
    cfg.backups = [head_config.BackupSpec(volume="vol0", to=str(target), every=10)]
    head_config.save(home, cfg)
    try:
        lab.kill("head0", 15)  # SIGTERM: a clean stop
        lab.restart_head()
        wait_until(lambda: state(api) == "UUUUU", 60, "head back")
        write_file(lab.dir / "mnt" / "vol0" / "s08", 200_000, seed=800)

        def backups_done():
            return [j for j in api.status()["jobs"] if j["kind"] == "backup" and j["state"] == "done"]
        done = wait_until(lambda: len(backups_done()) >= 2 and backups_done(), 90, "two scheduled backups")
        kinds = [j["result"]["kind"] for j in sorted(done, key=lambda j: j["id"])]
        assert kinds[0] == "full" and "incremental" in kinds[1:]
        manifest = json.loads((target / "vol0.backup.json").read_text())
        snaps = [s["name"] for s in api.status()["volumes"][0]["snapshots"]]
        assert manifest["body"]["snapshot"] in snaps
        mine = f"backup-{target_id(str(target))}-"
        assert [s for s in snaps if s.startswith(mine)] == [manifest["body"]["snapshot"]]
    finally:
        cfg.backups = []
        head_config.save(home, cfg)
        lab.kill("head0", 15)
        lab.restart_head()
        wait_until(lambda: state(api) == "UUUUU", 60, "head back without the schedule")
        for s in api.status()["volumes"][0]["snapshots"]:
            if s["name"].startswith(f"backup-{target_id(str(target))}-"):
                api.call("DELETE", f"/v1/snapshots/vol0/{s['name']}")
