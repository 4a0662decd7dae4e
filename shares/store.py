"""The shares config file: a `ShareTable` as JSON or YAML (by file suffix).

`load_table` of a missing file is the empty table. `save_table` writes
atomically, so a crash leaves the old or the new file, never a torn one.
"""
from __future__ import annotations

import json
import errno
import logging
from pathlib import Path

import yaml

from opie.shares.errors import CallError, ValidationErrors
from opie.fileio import atomic_write
from opie.shares.files import read_or_none
from opie.shares.model import ShareTable

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/opie/shares")


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def load_table(path: Path) -> ShareTable:
    """The table in `path` (empty if absent); ValidationErrors if malformed."""
    text = read_or_none(path)
    if text is None:
        return ShareTable()
    try:
        data = yaml.safe_load(text) if _is_yaml(path) else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "YAML" if _is_yaml(path) else "JSON"
        raise ValidationErrors([("config", f"{path}: not valid {kind}: {exc}")]) from exc
    if data is None:
        return ShareTable()
    if not isinstance(data, dict):
        raise ValidationErrors([("config", f"{path}: must hold a mapping")])
    return ShareTable.from_dict(data)


def save_table(path: Path, table: ShareTable) -> None:
    """Write `table` (validate it first) to `path` atomically."""
    data = table.to_dict()
    text = yaml.safe_dump(data, sort_keys=False) if _is_yaml(path) else \
        json.dumps(data, indent=2) + "\n"
    try:
        atomic_write(path, text)
    except OSError as exc:
        raise CallError(f"cannot write {path}: {exc}", exc.errno or errno.EIO) from exc
    log.info("shares config %s: %d shares", path, len(table.shares))
