"""The ISU's control channel: how a head asks about an ISU and adopts it.

Independent of NBD: JSON lines over TCP on the well-known CONTROL_PORT
(like the lease ports, so a head reaches an ISU at the address it
announces; the channel listens on that address only). With a certificate
directory both ends use the cluster CA (mutual TLS, as for NBD): a client
without a cluster certificate fails the handshake and learns nothing.

Who may do what (checked here, at the ISU, for every request): `status`
answers any client the channel accepted; an op that changes the ISU's
cluster config (HEAD_OPS: `join`, later `fence`) needs a client
certificate issued for role `head` (nbd.tls roles). An ISU's or an admin's
certificate, or a channel without TLS (loopback tests; `--insecure`), is
refused with `ok: false` and nothing changes. One request line (at most
LINE_MAX bytes), one reply line, then the connection closes::

    {"op": "status"}
        -> {"ok": true, "uuid", "nbd_port", "exports": [NAME...], "disks": [...],
            "cluster", "role", "config_gen", ...}
    {"op": "join", "cluster": ID, "role": "member"|"spare", "head": "A.B.C.D:PORT",
     "exports": [NAME...]}                                            (head only)
        -> {"ok": true, "config_gen": N}
           the ISU's copy of the cluster config (isu.json keys cluster, role,
           cluster_head, member_exports, config_gen) is durable before the reply,
           and the announcement's TXT shows it at once.
    {"op": "fence", "epoch": E}                                       (head only)
        -> {"ok": true, "epoch": E, "closed": N}
           connections of epochs below E are refused from now on, the N open
           ones were closed and their requests ended, E is durable on the ISU
           (isu.fencing); then this reply. Refused with nothing changed when E
           is below the accepted epoch ("stale head") or the ISU's
           `epoch_verifier` hook (the coordinator's check) does not confirm E.
    anything else, a join from a client that is not a head, or a join the ISU
    refuses (another cluster's ISU)
        -> {"ok": false, "error": "..."} and nothing changed.

`ControlServer` is the asyncio shell and the role check; what a request
means is the `handle(dict) -> dict` it is given (isu.services). `call` is
the head side.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from opie.isu.errors import ControlError
from opie.nbd import tls

log = logging.getLogger(__name__)

CONTROL_PORT = 7869
LINE_MAX = 16 * 1024
TIMEOUT = 5.0
HEAD_ROLE = "head"
HEAD_OPS = frozenset({"join", "fence"})   # ops that change the ISU's cluster config or epoch
FENCE_TIMEOUT = 8.0   # a fence's answer may wait for the ISU's running requests (isu.fencing.DRAIN_SECS)


class ControlServer:
    """Serve `handle` (a coroutine function: request -> reply) on host:port, TLS with
    `ssl_context`; `handle` sees only requests the client's role allows."""

    def __init__(self, handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.handle = handle
        self.ssl_context = ssl_context
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int = CONTROL_PORT) -> int:
        self._server = await asyncio.start_server(self._client, host, port, ssl=self.ssl_context,
                                                  limit=LINE_MAX + 1, reuse_address=True)
        bound = int(self._server.sockets[0].getsockname()[1])
        log.info("control channel on %s:%d (tls %s)", host, bound, "on" if self.ssl_context else "off")
        return bound

    @property
    def listening(self) -> str | None:
        """"HOST:PORT" the channel is bound to, or None when closed."""
        if self._server is None:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def answer(self, raw: bytes, role: str | None) -> dict[str, Any]:
        """The reply to one request line (without its newline) from a client
        whose verified certificate has `role` (None: no certificate, or no TLS)."""
        try:
            request = json.loads(raw)
        except ValueError:
            return {"ok": False, "error": "expected one JSON object per line"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "expected a JSON object with an 'op'"}
        if request["op"] in HEAD_OPS and role != HEAD_ROLE:
            held = f"a certificate of role {role}" if role else "no certificate"
            return {"ok": False, "error": f"{request['op']:.20} needs a head's certificate; this client has {held}"}
        try:
            return await self.handle(request)
        except Exception as exc:  # the boundary: log once, answer, keep serving
            log.exception("control %s failed", request.get("op"))
            return {"ok": False, "error": f"internal error: {exc}"}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            try:
                raw = await asyncio.wait_for(reader.readline(), TIMEOUT)
            except (ValueError, asyncio.LimitOverrunError):
                reply: dict[str, Any] = {"ok": False, "error": f"request longer than {LINE_MAX} bytes"}
            else:
                if not raw.endswith(b"\n"):
                    return
                role = tls.peer_role(writer.get_extra_info("peercert")) if self.ssl_context else None
                reply = await self.answer(raw.rstrip(b"\r\n"), role)
            if not reply.get("ok"):
                log.warning("control: refused a request from %s: %s", peer and peer[0], reply.get("error"))
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            log.debug("control: client %s: %s", peer, exc)
        finally:
            await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass


async def call(address: str, request: dict[str, Any], ssl_context: ssl.SSLContext | None = None,
               port: int = CONTROL_PORT, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send one request to the ISU at `address`; the reply, or ControlError (also for ok: false)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address, port, ssl=ssl_context,
                                    server_hostname=address if ssl_context else None,
                                    limit=LINE_MAX + 1), timeout)
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
        raise ControlError(f"ISU control channel {address}:{port} unreachable: {exc or 'timeout'}") from None
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError, ssl.SSLError, ValueError) as exc:
        raise ControlError(f"ISU {address}: no answer to {request.get('op')}: {exc or 'timeout'}") from None
    finally:
        await _close(writer)
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ControlError(f"ISU {address}: expected a JSON reply, got {raw[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"ISU {address}: expected a JSON object, got {reply!r:.80}")
    if not reply.get("ok"):
        raise ControlError(f"ISU {address} refused {request.get('op')}: {reply.get('error')}")
    return reply


async def fence(address: str, epoch: int, ssl_context: ssl.SSLContext | None, port: int = CONTROL_PORT,
                timeout: float = FENCE_TIMEOUT) -> int:
    """Ask the ISU at `address` to fence every epoch below `epoch`; returns once
    it acknowledged (E durable there) with how many connections it closed.
    ControlError when it refused (stale head, unverified epoch) or did not answer."""
    reply = await call(address, {"op": "fence", "epoch": epoch}, ssl_context, port=port, timeout=timeout)
    if reply.get("epoch") != epoch:
        raise ControlError(f"ISU {address}: fence acknowledged epoch {reply.get('epoch')!r}, asked {epoch}")
    return int(reply.get("closed", 0))
