"""The coordination client: etcd's v3 JSON gateway, for heads and ISUs alike.

Every key lives under `/opie/CLUSTER/`; callers name keys relative to that
prefix ("leader", "heads/head-a"). Transport is `etcd3gw` (one HTTP session per
endpoint, TLS verified against the cluster CA, our client certificate
presented); this module adds what etcd3gw lacks: endpoint rotation, the
create-if-absent transaction with the revisions the election needs, and a
watch whose wait is bounded.

Rotation: a call goes to the endpoint that answered last; on a connection
error, a timeout or "unavailable" (no leader, no quorum) it tries the next one,
each endpoint at most once per call, so a call fails with CoordUnavailable
after at most len(endpoints) x timeout. Requests retried on another endpoint
may have been applied by the first one: `put`, `delete`, `keepalive` and
`revoke` are idempotent, and `create` reports the key as it stands (a caller
recognises its own creation by the lease), so a retry is safe for each.

Every method blocks (HTTP); it is thread-safe, so asyncio code calls it with
`asyncio.to_thread`. Nothing is cached: each read is linearizable.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import requests
from etcd3gw import exceptions as gw_errors
from etcd3gw.client import Etcd3Client

from opie.discovery.errors import CoordRefused, CoordUnavailable, LeaseExpired
from opie.nbd import tls

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 0.5   # per endpoint: a LAN answers in ms; a paused member never
# gRPC status codes etcd reports for a member that cannot serve now.
_UNAVAILABLE_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
_NOT_FOUND = 5


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it. `create_revision` only grows for a key that is
    deleted and created again: the election's epoch."""
    key: str            # relative to the cluster prefix
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int          # 0: not on a lease


@dataclass(frozen=True)
class Created:
    """Outcome of `create`: `created` says whether this call made the key;
    `kv` is the key as it stands either way (ours, or the holder's)."""
    created: bool
    kv: KeyValue


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int            # seconds, as granted (etcd may raise a small TTL)


@dataclass(frozen=True)
class Event:
    kind: str           # "PUT" or "DELETE"
    kv: KeyValue


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data or "")


def _prefix_end(key: str) -> str:
    """The range end that selects every key starting with `key`."""
    raw = bytearray(key.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


class Coord:
    """A client of one Opie cluster's etcd (see the module docstring).

    `endpoints` are URLs ("https://10.0.0.5:2379"); `tls_dir` is a certificate
    directory of nbd.tls (ca-cert.pem, client-cert.pem, client-key.pem); None
    means plain HTTP (tests of refusal only). `timeout` bounds each attempt."""

    def __init__(self, endpoints: list[str], cluster: str, tls_dir: str | os.PathLike | None = None,
                 *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("endpoints: expected at least one etcd URL, got none")
        if not cluster or "/" in cluster:
            raise ValueError(f"cluster: expected a name without '/', got {cluster!r}")
        self.endpoints = list(endpoints)
        self.prefix = f"/opie/{cluster}/"
        self.timeout = timeout
        self._clients = [self._client(url, tls_dir) for url in self.endpoints]
        self._current = 0
        self._lock = threading.Lock()

    def _client(self, url: str, tls_dir: str | os.PathLike | None) -> Etcd3Client:
        parsed = requests.utils.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
            raise ValueError(f"endpoint: expected http(s)://HOST:PORT, got {url!r}")
        session = requests.Session()
        session.trust_env = False  # no proxy, and no CA bundle from the environment over ours
        if tls_dir is not None:
            d = Path(tls_dir)
            session.verify = str(d / tls.CA_CERT)
            if (d / tls.CLIENT_CERT).exists():
                session.cert = (str(d / tls.CLIENT_CERT), str(d / tls.CLIENT_KEY))
        return Etcd3Client(host=parsed.hostname, port=parsed.port, protocol=parsed.scheme,
                           timeout=self.timeout, api_path="/v3/", session=session)

    def close(self) -> None:
        for client in self._clients:
            client.session.close()

    # -- transport -------------------------------------------------------------

    def _order(self) -> list[int]:
        with self._lock:
            first = self._current
        n = len(self._clients)
        return [(first + i) % n for i in range(n)]

    def _answered(self, index: int) -> None:
        with self._lock:
            if self._current != index:
                log.info("etcd: now using %s", self.endpoints[index])
            self._current = index

    def _call(self, path: str, body: dict) -> dict:
        """POST `body` to the gateway's `path`, rotating endpoints (bounded)."""
        failures = []
        for index in self._order():
            client = self._clients[index]
            try:
                answer = client.post(client.get_url(path), json=body)
            except (gw_errors.ConnectionFailedError, gw_errors.ConnectionTimeoutError,
                    gw_errors.InternalServerError) as e:
                failures.append(f"{self.endpoints[index]}: {type(e).__name__} {e.detail_text or ''}".strip())
                continue
            except gw_errors.Etcd3Exception as e:
                code, message = self._error(e)
                if code in _UNAVAILABLE_CODES:
                    failures.append(f"{self.endpoints[index]}: {message}")
                    continue
                raise (LeaseExpired if code == _NOT_FOUND and "lease" in message else CoordRefused)(
                    f"etcd refused {path}: {message}", code) from None
            except requests.exceptions.RequestException as e:  # TLS refusal, bad answer
                failures.append(f"{self.endpoints[index]}: {e}")
                continue
            self._answered(index)
            return answer
        raise CoordUnavailable(f"no etcd endpoint answered {path}: " + "; ".join(failures))

    @staticmethod
    def _error(e: gw_errors.Etcd3Exception) -> tuple[int | None, str]:
        try:
            detail = json.loads(e.detail_text or "")
            return detail.get("code"), detail.get("message") or detail.get("error") or ""
        except ValueError:
            return None, e.detail_text or str(e)

    def _kv(self, raw: dict) -> KeyValue:
        key = _unb64(raw["key"]).decode()
        return KeyValue(key=key[len(self.prefix):] if key.startswith(self.prefix) else key,
                        value=_unb64(raw.get("value")),
                        create_revision=int(raw.get("create_revision", 0)),
                        mod_revision=int(raw.get("mod_revision", 0)),
                        version=int(raw.get("version", 0)), lease=int(raw.get("lease", 0)))

    # -- keys --------------------------------------------------------------------

    def key(self, name: str) -> str:
        """The full etcd key of `name` (relative to the cluster prefix)."""
        return self.prefix + name

    def get(self, name: str) -> KeyValue | None:
        """The key `name`, or None when it does not exist."""
        kvs = self._call("/kv/range", {"key": _b64(self.key(name))}).get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def get_prefix(self, name: str) -> list[KeyValue]:
        """Every key that starts with `name`, in key order."""
        full = self.key(name)
        kvs = self._call("/kv/range", {"key": _b64(full), "range_end": _prefix_end(full)}).get("kvs") or []
        return [self._kv(raw) for raw in kvs]

    def put(self, name: str, value: bytes | str, *, lease: int = 0) -> int:
        """Store `value` at `name` (on `lease` when not 0); returns the revision
        of the write. Durable on a quorum of members when it returns."""
        answer = self._call("/kv/put", {"key": _b64(self.key(name)), "value": _b64(value), "lease": lease})
        return int(answer["header"]["revision"])

    def delete(self, name: str) -> int:
        """Delete `name`; returns how many keys were deleted (0 or 1)."""
        return int(self._call("/kv/deleterange", {"key": _b64(self.key(name))}).get("deleted", 0))

    def create(self, name: str, value: bytes | str, *, lease: int = 0) -> Created:
        """One transaction: put `name` only if it does not exist
        (create_revision == 0). Either way returns the key as it then stands;
        a created key's create_revision is the transaction's revision."""
        key = _b64(self.key(name))
        answer = self._call("/kv/txn", {
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
            "success": [{"request_put": {"key": key, "value": _b64(value), "lease": lease}}],
            "failure": [{"request_range": {"key": key}}],
        })
        revision = int(answer["header"]["revision"])
        if answer.get("succeeded"):
            raw = value.encode() if isinstance(value, str) else value
            return Created(True, KeyValue(name, raw, revision, revision, 1, lease))
        kvs = answer["responses"][0]["response_range"].get("kvs") or []
        if not kvs:  # it vanished between compare and range: cannot happen in one txn
            raise CoordRefused(f"etcd: {name} neither created nor found at revision {revision}")
        return Created(False, self._kv(kvs[0]))

    def delete_if(self, name: str, create_revision: int) -> bool:
        """Delete `name` only if its create_revision is `create_revision` (so a
        holder never deletes a successor's key); True when it was deleted."""
        key = _b64(self.key(name))
        answer = self._call("/kv/txn", {
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL",
                         "create_revision": create_revision}],
            "success": [{"request_delete_range": {"key": key}}],
        })
        return bool(answer.get("succeeded"))

    def raise_to(self, name: str, value: int, *, attempts: int = 5) -> int:
        """Store the integer `value` at `name` unless a larger one is there
        already (compare-and-swap on the mod revision, retried at most
        `attempts` times under contention); returns the value now stored. The
        stored value therefore only grows: the cluster's current epoch."""
        for _ in range(attempts):
            kv = self.get(name)
            if kv is None:
                if self.create(name, str(value)).created:
                    return value
                continue
            held = int(kv.value)
            if held >= value:
                return held
            key = _b64(self.key(name))
            answer = self._call("/kv/txn", {
                "compare": [{"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": kv.mod_revision}],
                "success": [{"request_put": {"key": key, "value": _b64(str(value))}}],
            })
            if answer.get("succeeded"):
                return value
        raise CoordUnavailable(f"etcd: {name} kept changing; not raised to {value} in {attempts} attempts")

    # -- leases ------------------------------------------------------------------

    def grant(self, ttl: int) -> Lease:
        """A new lease of `ttl` seconds (etcd may grant more: its minimum)."""
        answer = self._call("/lease/grant", {"TTL": ttl})
        if answer.get("error"):
            raise CoordRefused(f"etcd refused a lease of {ttl}s: {answer['error']}")
        return Lease(int(answer["ID"]), int(answer["TTL"]))

    def keepalive(self, lease: int) -> int:
        """Renew `lease` to its full TTL, counted from when etcd handled the
        request; returns that TTL. Raises LeaseExpired if the lease is gone."""
        answer = self._call("/lease/keepalive", {"ID": lease})
        ttl = int((answer.get("result") or {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseExpired(f"etcd: lease {lease:x} has expired")
        return ttl

    def revoke(self, lease: int) -> None:
        """End `lease` now: every key on it is deleted. A lease already gone is fine."""
        try:
            self._call("/kv/lease/revoke", {"ID": lease})
        except LeaseExpired:
            pass

    # -- watch -------------------------------------------------------------------

    def watch(self, name: str, *, start_revision: int, timeout: float, prefix: bool = False) -> list[Event]:
        """Changes of `name` (or of every key under it, with `prefix`) at or
        after `start_revision`, waiting at most about `timeout` seconds for the
        first one; [] when nothing changed in that time. Returns the first
        batch of events etcd sends."""
        full = self.key(name)
        create = {"key": _b64(full), "start_revision": start_revision}
        if prefix:
            create["range_end"] = _prefix_end(full)
        failures = []
        for index in self._order():
            client = self._clients[index]
            try:
                response = client.session.post(client.get_url("/watch"), json={"create_request": create},
                                               stream=True, timeout=(self.timeout, timeout))
            except requests.exceptions.RequestException as e:
                failures.append(f"{self.endpoints[index]}: {e}")
                continue
            with response:
                if response.status_code != 200:
                    failures.append(f"{self.endpoints[index]}: HTTP {response.status_code}")
                    continue
                self._answered(index)
                try:
                    for line in response.iter_lines():
                        result = json.loads(line).get("result") or {}
                        if result.get("compact_revision"):
                            raise CoordRefused(f"etcd: revision {start_revision} of {name} is compacted")
                        events = result.get("events") or []
                        if events:
                            return [Event(raw.get("type", "PUT"), self._kv(raw["kv"])) for raw in events]
                except requests.exceptions.RequestException:
                    pass  # the read timed out (or the member went away): nothing seen in time
                return []
        raise CoordUnavailable(f"no etcd endpoint answered a watch of {name}: " + "; ".join(failures))

    # -- health ------------------------------------------------------------------

    def healthy(self, endpoint: int) -> bool:
        """True if endpoint number `endpoint` reports itself healthy (it has a
        leader and answers a linearizable read); False on any failure."""
        client = self._clients[endpoint]
        try:
            response = client.session.get(client.base_url + "/health", timeout=self.timeout)
            return response.status_code == 200 and response.json().get("health") == "true"
        except (requests.exceptions.RequestException, ValueError):
            return False

    def is_leader(self, endpoint: int) -> bool:
        """True if endpoint number `endpoint` is the raft leader now."""
        client = self._clients[endpoint]
        try:
            status = client.post(client.get_url("/maintenance/status"), json={})
            return int(status["leader"]) == int(status["header"]["member_id"])
        except (gw_errors.Etcd3Exception, requests.exceptions.RequestException, KeyError, ValueError):
            return False
