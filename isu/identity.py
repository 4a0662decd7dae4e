"""The ISU's persistent identity and config: `isu.json` in its state dir.

Layout (JSON object, written atomically: temp file, fsync, rename):
    {"magic": "opie-isu", "version": 1, "uuid": "<uuid4>", "created": <unix time>,
     ... further keys owned by other modules (name, address, head, cluster) ...}

The UUID is created once and never changes; other modules update their own
keys through `update()`, which keeps keys it does not know.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from opie.fileio import atomic_write

log = logging.getLogger(__name__)

MAGIC = "opie-isu"
VERSION = 1
FILENAME = "isu.json"


class IdentityError(Exception):
    """The state dir holds something that is not a valid ISU identity."""


def _write_atomic(path: Path, obj: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load(state_dir: str | os.PathLike) -> dict[str, Any]:
    """Load the ISU config, creating a new identity on first use."""
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / FILENAME
    if not path.exists():
        cfg = {"magic": MAGIC, "version": VERSION, "uuid": str(uuid.uuid4()), "created": int(time.time())}
        _write_atomic(path, cfg)
        log.info("new ISU identity %s in %s", cfg["uuid"], d)
        return cfg
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path}: unreadable ISU config: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("magic") != MAGIC:
        raise IdentityError(f"{path}: expected magic {MAGIC!r}, got {cfg.get('magic') if isinstance(cfg, dict) else cfg!r}")
    if cfg.get("version") != VERSION:
        raise IdentityError(f"{path}: expected version {VERSION}, got {cfg.get('version')!r}")
    try:
        uuid.UUID(str(cfg.get("uuid")))
    except ValueError:
        raise IdentityError(f"{path}: invalid uuid {cfg.get('uuid')!r}") from None
    return cfg


def update(state_dir: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Set keys in the ISU config (never magic/version/uuid) and persist."""
    for k in ("magic", "version", "uuid"):
        if k in changes:
            raise ValueError(f"{k} of an ISU identity cannot change")
    cfg = load(state_dir)
    cfg.update(changes)
    _write_atomic(Path(state_dir) / FILENAME, cfg)
    return cfg
