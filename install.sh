#!/usr/bin/env bash
# Install everything Opie needs on a fresh Debian 12 machine, idempotently.
# Debian packages are installed only when missing, and the Python package
# (editable, with test extras) only when `opie` is not importable at this
# checkout (or an older install of it still provides a top-level `nbd`), so a
# second run takes a few seconds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

DEBS=(
  nbdkit libnbd-bin qemu-utils          # NBD peers for interop tests and benches
  fuse3 fuse2fs e2fsprogs util-linux    # nbdfuse + loop + ext4
  iproute2 iputils-arping socat udev    # lab hosts, serial pty pairs, uevents
  samba samba-vfs-modules smbclient nfs-ganesha nfs-ganesha-vfs libnfs-utils rpcbind acl attr
  zfs-fuse avahi-utils openssl procps psmisc
  etcd-server etcd-client               # coordination: the heads' election and the cluster config
)

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install.sh: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Do not let package scripts start daemons (no init system in the lab VM).
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

py=${PYTHON:-python3}
if ! "$py" - "$here" <<'PY' 2>/dev/null
import importlib.util, sys, os
os.chdir("/")  # find the installed opie, not one in the current directory
spec = importlib.util.find_spec("opie.cli.main")
assert spec and os.path.dirname(os.path.dirname(spec.origin)) == sys.argv[1]
old = importlib.util.find_spec("nbd")  # a pre-namespace install of this checkout
assert old is None or not (old.origin or "").startswith(sys.argv[1])
for m in ("numpy", "cryptography", "yaml", "zeroconf", "pyroute2", "pyudev",
          "serial", "flask", "dbus_next", "isal", "etcd3gw", "requests", "pytest", "pytest_timeout", "hypothesis", "wheel"):
    importlib.import_module(m)
PY
then
  echo "install.sh: installing the opie Python package (editable) and its dependencies"
  "$py" -m pip install -q --disable-pip-version-check -e "$here[test]"
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
command -v opie >/dev/null || { echo "install.sh: 'opie' is not on PATH" >&2; exit 1; }
