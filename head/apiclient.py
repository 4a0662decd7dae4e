"""Client of the head's REST API (used by the CLI and the GUI).

`HeadAPI.locate()` finds the head: explicit url/token file, else the
OPIE_HEAD / OPIE_TOKEN_FILE environment, else the lab's lab.json."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_LAB = "/var/tmp/opie-lab"


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class HeadAPI:
    def __init__(self, url: str, token: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def locate(cls, url: str | None = None, token_file: str | None = None,
               lab_dir: str | None = None) -> "HeadAPI":
        url = url or os.environ.get("OPIE_HEAD")
        token_file = token_file or os.environ.get("OPIE_TOKEN_FILE")
        if not url or not token_file:
            lab = Path(lab_dir or os.environ.get("OPIE_LAB", DEFAULT_LAB)) / "lab.json"
            try:
                heads = json.loads(lab.read_text()).get("heads", [])
            except (OSError, ValueError):
                heads = []
            active = [h for h in heads if h.get("role") == "active"] or heads
            if not active:
                raise APIError(0, f"no head given (--head/--token-file or OPIE_HEAD/OPIE_TOKEN_FILE) "
                                  f"and no head in {lab}")
            url = url or active[0]["api"]
            token_file = token_file or active[0]["token_file"]
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise APIError(0, f"cannot read the API token {token_file}: {exc.strerror}") from None
        return cls(url, token)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                msg = exc.reason
            raise APIError(exc.code, msg) from None
        except urllib.error.URLError as exc:
            raise APIError(0, f"head at {self.url} unreachable: {exc.reason}") from None

    def status(self) -> dict[str, Any]:
        return self.call("GET", "/v1/status")

    def job(self, job_id: int) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}")
