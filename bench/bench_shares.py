"""Benchmark: smbclient put and get of one file to two shares of the same smbd.

    python3 bench/bench_shares.py --root-a /mnt/raid5vol --root-b /srv/plain \
        [--label-a raid5 --label-b plain] [--size-mib 1024] [--runs 3]

Each root gets a share (directory `opie-bench` inside it, removed afterwards);
one smbd on 127.0.0.1 serves both, a temporary user is created and deleted.
Prints the median MB/s of each direction per share and the ratio a/b.
`get` reads what was just written, so without --drop-caches it may come from
the server's page cache; --drop-caches writes /proc/sys/vm/drop_caches
before each get (affects the whole host).
"""
from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opie.shares.clients import file_sha256 as sha256, smbclient, write_random  # noqa: E402
from opie.shares.model import Protocol, Share, ShareTable  # noqa: E402
from opie.shares.process import free_port  # noqa: E402
from opie.shares.service import ShareService  # noqa: E402
from opie.shares.smb import SmbSettings  # noqa: E402
from opie.shares.smbd import write_config  # noqa: E402
from opie.shares.users import UserManager  # noqa: E402

HOST = "127.0.0.1"
BENCH_DIR = "opie-bench"


def timed(argv_run, what: str) -> float:
    start = time.monotonic()
    done = argv_run()
    elapsed = time.monotonic() - start
    if done.returncode != 0 or "NT_STATUS" in done.stdout:
        raise SystemExit(f"{what} failed: {done.stdout}{done.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root-a", type=Path, required=True)
    parser.add_argument("--root-b", type=Path, required=True)
    parser.add_argument("--label-a", default="a")
    parser.add_argument("--label-b", default="b")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"),
                        help="where the client's source and copies live")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3 (median)")
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="opie-bench-", dir=args.tmp))
    work.chmod(0o755)
    settings = SmbSettings(state_dir=str(work / "smb"), port=free_port())
    write_config(settings, ShareTable())
    users = UserManager(settings.conf_path, work / "users.json")
    user, password = "opb" + secrets.token_hex(3), secrets.token_urlsafe(12)
    service = ShareService({Protocol.SMB: settings})
    roots = {args.label_a: args.root_a.resolve(), args.label_b: args.root_b.resolve()}
    results: dict[str, dict[str, list[float]]] = {label: {"put": [], "get": []} for label in roots}
    created = []
    try:
        users.add(user, password)
        table = ShareTable({label: str(root) for label, root in roots.items()})
        for label in roots:
            table = table.with_share(Share(label, label, BENCH_DIR, users=(user,)))
            if not (roots[label] / BENCH_DIR).exists():
                created.append(roots[label] / BENCH_DIR)
        service.start(table)
        src = work / "src.bin"
        write_random(src, size)
        want = sha256(src)
        for run in range(args.runs):
            for label in roots:
                dst = work / f"get-{label}.bin"
                (roots[label] / BENCH_DIR / "f.bin").unlink(missing_ok=True)
                put = timed(lambda: smbclient(HOST, settings.port, label, user, password,
                                              f"put {src} f.bin", timeout=1800), f"put {label}")
                if args.drop_caches:
                    subprocess.run(["sync"], check=True)
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                get = timed(lambda: smbclient(HOST, settings.port, label, user, password,
                                              f"get f.bin {dst}", timeout=1800), f"get {label}")
                if run == 0 and sha256(dst) != want:
                    raise SystemExit(f"{label}: sha256 of the copy differs")
                dst.unlink()
                results[label]["put"].append(size / put / 1e6)
                results[label]["get"].append(size / get / 1e6)
                print(f"run {run + 1}/{args.runs} {label}: put {size / put / 1e6:.0f} MB/s, "
                      f"get {size / get / 1e6:.0f} MB/s", file=sys.stderr)
    finally:
        service.stop()
        try:
            users.delete(user)
        except Exception as exc:  # report, then make sure the account goes
            print(f"user cleanup: {exc}", file=sys.stderr)
        subprocess.run(["userdel", user], capture_output=True)
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {label: {k: statistics.median(v) for k, v in r.items()} for label, r in results.items()}
    a, b = args.label_a, args.label_b
    print(f"smbclient via one smbd, {args.size_mib} MiB file, median of {args.runs} runs"
          f"{', caches dropped before get' if args.drop_caches else ''}")
    print(f"{'share':<10} {'root':<40} {'put MB/s':>9} {'get MB/s':>9}")
    for label in (a, b):
        print(f"{label:<10} {str(roots[label]):<40} {med[label]['put']:>9.0f} "
              f"{med[label]['get']:>9.0f}")
    print(f"{'ratio':<10} {a + '/' + b:<40} {med[a]['put'] / med[b]['put']:>9.2f} "
          f"{med[a]['get'] / med[b]['get']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
