"""The cluster CA and TLS contexts for NBD.

A certificate directory has the layout nbdkit, libnbd (nbdinfo, nbdcopy
`?tls-certificates=DIR`) and qemu expect:

    ca-cert.pem                      the cluster CA certificate
    ca-key.pem                       the CA key (only in the CA's own directory)
    server-cert.pem, server-key.pem  this host's server identity
    client-cert.pem, client-key.pem  this host's client identity

Both sides verify the peer against ca-cert.pem: servers require a client
certificate signed by the cluster CA, so a client without one, or with one
from a foreign CA, fails the TLS handshake and learns nothing.
Keys are written 0600; nothing is overwritten unless asked.

Roles: every certificate the CA issues names what its holder is in the
subject's organizational unit (OU): `head` (may adopt and fence ISUs),
`isu` (a storage node), or `admin` (an operator's tools: nbdinfo, nbdcopy,
backups). Only the CA can write a subject, so a verified peer's role can be
trusted; the ISU's control channel lets only `head` change its cluster
config (isu.control). The default is `isu`: acting as a head must be asked for.

Plain listeners: serving without TLS is for loopback (tests, benchmarks).
`vet_plain_listener` is the one rule for every listener (ISU NBD and control
channel, head NBD and API): on a network address it is refused unless the
admin passed --insecure (the head's `insecure` key), and then logged at WARNING.
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from opie.nbd.errors import PlainListenerRefused

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca-cert.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
VALID_DAYS = 3650
ROLES = ("head", "isu", "admin")
DEFAULT_ROLE = "isu"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, role: str | None = None) -> x509.Name:
    ou = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)] if role else []
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Opie cluster"), *ou,
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def cert_role(cert: x509.Certificate) -> str | None:
    """The role a certificate was issued for (its subject OU), or None (issued before roles)."""
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(ous[0].value) if len(ous) == 1 else None


def peer_role(peercert: dict | None) -> str | None:
    """The role of a verified TLS peer, from `SSLSocket.getpeercert()` (None: no
    certificate, or one without exactly one role)."""
    if not peercert:
        return None
    ous = [value for rdn in peercert.get("subject", ()) for key, value in rdn
           if key == "organizationalUnitName"]
    return ous[0] if len(ous) == 1 else None


def create_ca(directory: str | os.PathLike, name: str = "Opie cluster CA", force: bool = False) -> Path:
    """Create a cluster CA in `directory` (ca-cert.pem, ca-key.pem).
    Refuses to replace an existing CA unless `force`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / CA_CERT).exists() and not force:
        raise FileExistsError(f"{d / CA_CERT} exists; refusing to replace the cluster CA")
    key = _new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(d / CA_KEY, key)
    _write_cert(d / CA_CERT, cert)
    log.info("created cluster CA in %s", d)
    return d


def default_names() -> list[str]:
    """Names a lab host's certificate should carry: loopback plus hostname."""
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names


def issue(ca_dir: str | os.PathLike, out_dir: str | os.PathLike, *, server_names: list[str] | None = None,
          client_name: str | None = None, role: str = DEFAULT_ROLE, force: bool = False,
          server_as_client: bool = False) -> Path:
    """Issue server and client certificates for `role` (one of ROLES), signed
    by the CA in `ca_dir`, into `out_dir` (which also gets a copy of
    ca-cert.pem, but never the CA key unless out_dir is ca_dir).
    `server_names` become subjectAltNames (DNS names or IP addresses).
    A certificate already there is kept if it has `role`; one of another
    role raises FileExistsError unless `force` (then both are replaced).
    `server_as_client`: the server certificate may also authenticate as a
    client (etcd presents it on its peer links and to its own gRPC gateway)."""
    if role not in ROLES:
        raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    ca = Path(ca_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate((ca / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca / CA_KEY).read_bytes(), None)
    if out.resolve() != ca.resolve():
        (out / CA_CERT).write_bytes((ca / CA_CERT).read_bytes())
    names = server_names or default_names()
    cn = client_name or f"opie-{uuid.uuid4().hex[:8]}"
    for cert_file, key_file, usage, sans in (
        (SERVER_CERT, SERVER_KEY, ExtendedKeyUsageOID.SERVER_AUTH, names),
        (CLIENT_CERT, CLIENT_KEY, ExtendedKeyUsageOID.CLIENT_AUTH, [cn]),
    ):
        usages = [usage, ExtendedKeyUsageOID.CLIENT_AUTH] if server_as_client and usage == \
            ExtendedKeyUsageOID.SERVER_AUTH else [usage]
        if (out / cert_file).exists() and not force:
            held = cert_role(x509.load_pem_x509_certificate((out / cert_file).read_bytes()))
            if held == role:
                continue
            raise FileExistsError(f"{out / cert_file} was issued for role {held or '(none)'}, not {role}; "
                                  f"replace it with force")
        key = _new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        alt: list[x509.GeneralName] = []
        for n in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        cert = (x509.CertificateBuilder()
                .subject_name(_name(sans[0] if usage == ExtendedKeyUsageOID.SERVER_AUTH else cn, role))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                             content_commitment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_key(out / key_file, key)
        _write_cert(out / cert_file, cert)
    log.info("issued %s certificates in %s for %s", role, out, ", ".join(names))
    return out


def server_context(tls_dir: str | os.PathLike) -> ssl.SSLContext:
    """Server context: our server cert, client certs from the CA required."""
    d = Path(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(d / SERVER_CERT, d / SERVER_KEY)
    ctx.load_verify_locations(d / CA_CERT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls_dir: str | os.PathLike) -> ssl.SSLContext:
    """Client context: verify the server against the CA (hostname included),
    present our client certificate when the directory has one."""
    d = Path(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(d / CA_CERT)
    if (d / CLIENT_CERT).exists():
        ctx.load_cert_chain(d / CLIENT_CERT, d / CLIENT_KEY)
    return ctx


def is_loopback(host: str | None) -> bool:
    """True for a loopback host (127.0.0.0/8, ::1, localhost); False for a wildcard
    (0.0.0.0, ::, ""), any other address, or None (an address not known yet)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def vet_plain_listener(what: str, host: str | None, *, insecure: bool) -> None:
    """Call before `what` starts serving without TLS on `host` (None: an address
    not known yet, e.g. one to be leased). Loopback passes silently. A network
    address raises PlainListenerRefused unless `insecure`; with it, logs a WARNING."""
    if is_loopback(host):
        return
    where = f"network address {host or '0.0.0.0'}" if host is not None else "a network address"
    if not insecure:
        raise PlainListenerRefused(f"{what} would serve without TLS on {where}: give it a certificate "
                                   f"directory, listen on loopback, or pass --insecure to allow it anyway")
    log.warning("%s serves without TLS on %s, allowed as insecure: anyone who reaches it can use it",
                what, where)
