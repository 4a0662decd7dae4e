"""The head's REST API (JSON over HTTP) for the CLI and the GUI.

Every request needs `Authorization: Bearer TOKEN` (the token lives in the
head's state dir, mode 0600); anything else gets 401 and learns nothing. An
empty token is refused when the server is built (`ConfigError`), so the head
does not start with one.
Handlers run in the HTTP server's threads and hand each operation to the
head's event loop (`run_coroutine_threadsafe`), bounded by a timeout; they
never touch head state directly.

Hostile clients are bounded: every socket read or write of a connection
times out after REQUEST_TIMEOUT (a client that never sends its headers is
hung up on), at most MAX_CONNECTIONS connections are served at once (more
are closed at once, logged), and a body needs a decimal Content-Length of at
most MAX_BODY bytes (anything else is a 400 and nothing is read).

    GET    /v1/status                               array, volumes, snapshots, jobs
    POST   /v1/snapshots          {volume, name}    take a snapshot (fs frozen)
    DELETE /v1/snapshots/VOLUME/NAME                delete it (space comes back)
    POST   /v1/snapshots/VOLUME/NAME/mount {mountpoint?}   mount read-only
    POST   /v1/volumes            {name, size}      create a thin volume (exported, not mounted)
    DELETE /v1/volumes/VOLUME     {recursive?}      delete an unmounted volume
    POST   /v1/volumes/VOLUME/mount | unmount       mount or unmount a volume's filesystem
    POST   /v1/array/scrub                          start a scrub job
    POST   /v1/backups            {volume, to, keep_snapshot?}   start a backup job
    POST   /v1/restores           {volume, from, snapshot?}      start a restore job
    GET    /v1/jobs/ID                              a job's state and progress
    GET    /v1/shares                               share definitions
    POST   /v1/shares             {name, volume, protocol, ...}   add a share (applied live)
    DELETE /v1/shares/NAME                          remove a share (applied live)
    GET    /v1/isus                                 discovered ISUs: class, liveness, TXT
    GET    /v1/ha                                   HA: role, epoch, lease left, leader, mirror, last timeline
    POST   /v1/ha/switchover                        planned handover: the active stops cleanly and resigns
    POST   /v1/isus/UUID/adopt    {role}            adopt an ISU as member or spare

While a head waits for its member ISUs (discovery, head/cluster.py) only
/v1/isus answers; everything else is 503. A passive head (HA) answers
/v1/ha; everything else is 503 naming the active head.

Errors are `{"error": "..."}` with 400 (bad input), 404 (unknown), 409
(conflict with the current state) or 500.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opie.head.config import ConfigError
from opie.head.errors import HeadError
from opie.head.exports import snapshot_export
from opie.shares.errors import CallError, ValidationErrors

log = logging.getLogger(__name__)

CALL_TIMEOUT = 600.0
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 5.0   # seconds a connection may stay silent while the head waits for it
MAX_CONNECTIONS = 128   # connections served at once (one thread each)


class _Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _BoundedHTTPServer(ThreadingHTTPServer):
    """One daemon thread per connection, at most MAX_CONNECTIONS of them; the
    connection beyond that is closed at once (the accept loop never waits)."""

    daemon_threads = True
    # listen backlog: http.server's default of 5 lets a burst of connections the
    # accept loop has not taken yet fill the queue, and the kernel drops the next
    # SYN (its client then waits ~1 s for the retransmission)
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log.warning("API: %d connections open; closed the one from %s", MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _content_length(value: str | None) -> int:
    """The body length a request announces: 0 without the header; _Error(400) unless decimal and <= MAX_BODY."""
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit()):
        raise _Error(400, f"Content-Length: expected a number of bytes, got {value!r}")
    if int(value) > MAX_BODY:
        raise _Error(400, "request body too large")
    return int(value)


class APIServer:
    """The API's HTTP listener. Build it on the head's event loop; `start` and `stop` from there."""

    def __init__(self, head, host: str, port: int):
        if not head.token:
            raise ConfigError(f"api-token: the head's API token in {head.state_dir} is empty; "
                              "remove the file and the head makes a new one")
        self.head = head
        self.loop = asyncio.get_running_loop()
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "opie-head"
            timeout = REQUEST_TIMEOUT  # applied to the socket: bounds every read and write

            def log_message(self, fmt, *args):  # route to logging, not stderr
                log.debug("%s %s", self.address_string(), fmt % args)

            def _reply(self, status: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                try:
                    auth = self.headers.get("Authorization", "")
                    if not hmac.compare_digest(auth.encode(), f"Bearer {api.head.token}".encode()):
                        raise _Error(401, "missing or wrong API token")
                    length = _content_length(self.headers.get("Content-Length"))
                    body = {}
                    if length:
                        try:
                            body = json.loads(self.rfile.read(length))
                        except ValueError:
                            raise _Error(400, "request body is not JSON") from None
                        if not isinstance(body, dict):
                            raise _Error(400, "request body must be a JSON object")
                    path = [urllib.parse.unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
                    status, obj = api.dispatch(method, path, body)
                    self._reply(status, obj)
                except _Error as exc:
                    self._reply(exc.status, {"error": str(exc)})
                except Exception as exc:
                    log.exception("API %s %s failed", method, self.path)
                    self._reply(500, {"error": f"internal error: {exc}"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        self.httpd = _BoundedHTTPServer((host, port), Handler)
        h, p = self.httpd.server_address[:2]
        self.url = f"http://{h}:{p}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="head-api", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("API on %s", self.url)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------ routing
    def _call(self, coro):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(CALL_TIMEOUT)
        except HeadError as exc:
            raise _Error(exc.status, str(exc)) from None

    def _sync(self, fn, *args):
        async def wrap():
            return fn(*args)
        return self._call(wrap())

    def dispatch(self, method: str, path: list[str], body: dict):
        head = self.head
        if path[:1] != ["v1"]:
            raise _Error(404, "unknown path")
        p = path[1:]
        if p[:1] == ["isus"]:
            return self._isus(method, p[1:], body)
        if p[:1] == ["ha"]:
            return self._ha(method, p[1:])
        if head.array is None and head.ha is not None:
            raise _Error(503, f"this head is {head.ha.role} (HA): it serves nothing now; the active head is "
                              f"{head.ha.election.leader or 'not elected yet'} (see /v1/ha)")
        if head.array is None:
            raise _Error(503, "the head is starting: waiting for its member ISUs (see /v1/isus)")
        if method == "GET" and p == ["status"]:
            return 200, self._sync(head.status)
        if method == "POST" and p == ["snapshots"]:
            volume, name = _str(body, "volume"), _str(body, "name")
            return 201, self._call(head.create_snapshot(volume, name))
        if method == "DELETE" and len(p) == 3 and p[0] == "snapshots":
            self._call(head.delete_snapshot(p[1], p[2]))
            return 200, {"deleted": f"{p[1]}@{p[2]}"}
        if method == "POST" and len(p) == 4 and p[0] == "snapshots" and p[3] == "mount":
            export = snapshot_export(p[1], p[2])
            if export not in head.nbd.exports:
                raise _Error(404, f"no snapshot {export}")
            mp = body.get("mountpoint")
            if mp is not None and not isinstance(mp, str):
                raise _Error(400, "mountpoint must be a string")
            return 200, self._call(head.mount(export, mp, read_only=True))
        if method == "POST" and p == ["volumes"]:
            name, size = _str(body, "name"), body.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise _Error(400, "size: a positive number of bytes is required")
            return 201, self._call(head.create_volume(name, size))
        if method == "DELETE" and len(p) == 2 and p[0] == "volumes":
            self._call(head.delete_volume(p[1], recursive=bool(body.get("recursive"))))
            return 200, {"deleted": p[1]}
        if method == "POST" and len(p) == 3 and p[0] == "volumes" and p[2] in ("mount", "unmount"):
            if p[1] not in {v.name for v in head.pool.list_volumes()}:
                raise _Error(404, f"no volume named {p[1]!r}")
            if p[2] == "mount":
                return 200, self._call(head.mount(p[1]))
            self._call(head.unmount(p[1]))
            return 200, {"unmounted": p[1]}
        if p[:1] == ["shares"]:
            return self._shares(method, p[1:], body)
        if method == "POST" and p == ["array", "scrub"]:
            return 202, self._sync(lambda: head.start_scrub().to_json())
        if method == "POST" and p == ["backups"]:
            volume, to = _str(body, "volume"), _str(body, "to")
            keep = bool(body.get("keep_snapshot", False))
            return 202, self._sync(lambda: head.start_backup(volume, to, keep).to_json())
        if method == "POST" and p == ["restores"]:
            volume, src = _str(body, "volume"), _str(body, "from")
            snap = body.get("snapshot")
            if snap is not None and not isinstance(snap, str):
                raise _Error(400, "snapshot must be a string")
            return 202, self._sync(lambda: head.start_restore(volume, src, snap).to_json())
        if method == "GET" and len(p) == 2 and p[0] == "jobs":
            try:
                job = head.jobs.jobs[int(p[1])]
            except (ValueError, KeyError):
                raise _Error(404, f"no job {p[1]}") from None
            return 200, job.to_json()
        raise _Error(404, f"no such call: {method} /{'/'.join(path)}")


    def _shares(self, method: str, p: list[str], body: dict):
        files = self.head.files
        if files is None:
            raise _Error(409, "shares are not enabled on this head (head.json: shares.enabled)")
        try:
            if method == "GET" and not p:
                return 200, self._sync(files.list)
            if method == "POST" and not p:
                return 201, self._call(files.add(body))
            if method == "DELETE" and len(p) == 1:
                self._call(files.delete(p[0]))
                return 200, {"deleted": p[0]}
        except ValidationErrors as exc:
            raise _Error(400, str(exc)) from None
        except CallError as exc:
            raise _Error(500, str(exc)) from None
        raise _Error(404, f"no such call: {method} /v1/shares/{'/'.join(p)}")


    def _ha(self, method: str, p: list[str]):
        ha = self.head.ha
        if method == "GET" and not p:
            if ha is None:
                return 200, {"enabled": False, "name": self.head.cfg.name, "role": self.head.role}
            return 200, self._call(ha.describe())
        if method == "POST" and p == ["switchover"]:
            if ha is None:
                raise _Error(409, "HA is off on this head (head.json: ha)")
            return 200, self._call(ha.switchover())
        raise _Error(404, f"no such call: {method} /v1/ha/{'/'.join(p)}")

    def _isus(self, method: str, p: list[str], body: dict):
        cluster = self.head.cluster
        if cluster is None:
            raise _Error(409, "discovery is off on this head (head.json: discover)")
        if method == "GET" and not p:
            return 200, {"isus": self._sync(cluster.isus)}
        if method == "POST" and len(p) == 2 and p[1] == "adopt":
            return 200, self._call(cluster.adopt(p[0], _str(body, "role")))
        raise _Error(404, f"no such call: {method} /v1/isus/{'/'.join(p)}")


def _str(body: dict, key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v:
        raise _Error(400, f"{key}: a non-empty string is required")
    return v
