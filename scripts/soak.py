#!/usr/bin/env python3
"""Soak test (not CI): load user-rpc at a fixed concurrency for N minutes while PostgreSQL is
restarted, then print errors by status, p99 per minute and the server's RSS per minute.

It starts everything it needs and harms nothing else: a private PostgreSQL cluster (initdb into a
temporary directory, a free port; as the `postgres` user when run as root), `user-rpc seed`, and
`user-rpc serve` on free ports. The load is `user-rpc bench --json`, one run per minute, each
strategy for a third of it. PostgreSQL gets a fast shutdown (SIGINT) and comes back after
--down-seconds, --restarts times, evenly spread. Exit status 1 if the server died, a restart was
never recovered from, or RSS was not flat: the least-squares trend of every RSS sample after the
first minute, projected over the run, must stay within --rss-tolerance of where it starts.

    cargo build --release && python3 scripts/soak.py                 # 10 minutes, 2 restarts
    python3 scripts/soak.py --minutes 2 --restarts 1                  # a quick look
    python3 scripts/soak.py --replay benchmarks/soak.json             # a saved run's report
"""

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin():
    if os.environ.get("PG_BIN"):
        return os.environ["PG_BIN"]
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        if os.path.exists(os.path.join(out.stdout.strip(), "initdb")):
            return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    versions = sorted(os.listdir("/usr/lib/postgresql"))
    return f"/usr/lib/postgresql/{versions[-1]}/bin"


class Postgres:
    """A private cluster whose server can be stopped and started again on the same port."""

    def __init__(self, workdir):
        self.bin = pg_bin()
        self.dir = workdir
        self.data = os.path.join(workdir, "data")
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(workdir, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            [f"{self.bin}/initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync",
             "-D", self.data],
            check=True, stdout=subprocess.DEVNULL, user=self.user,
        )
        self.proc = None
        self.log = open(os.path.join(workdir, "postgres.log"), "ab")

    def url(self, db):
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def start(self):
        self.proc = subprocess.Popen(
            [f"{self.bin}/postgres", "-D", self.data, "-p", str(self.port), "-k", self.dir,
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=self.log, user=self.user,
        )
        for _ in range(200):
            r = subprocess.run([f"{self.bin}/pg_isready", "-q", "-h", "127.0.0.1", "-p",
                                str(self.port)])
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("PostgreSQL did not start; see " + self.log.name)

    def stop(self, sig=signal.SIGINT):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_healthy(admin, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{admin}/healthz", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def slope_per_minute(points):
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


def report(settings, minutes, restarts, rss, alive):
    """Prints the per-minute table and the verdict; returns the exit status."""
    print(f"\nuser-rpc soak: {settings['minutes']} min, concurrency {settings['concurrency']}, "
          f"batch {settings['batch']}, {settings['users']} users, PostgreSQL restarted "
          f"{len(restarts)} times ({settings['down_seconds']:g} s down each)\n")
    print(f"{'min':>3} {'requests':>9} {'errors by status':<34} {'p99 errgroup':>12} "
          f"{'p99 mapreduce':>13} {'p99 batch':>10} {'RSS MiB':>8}")
    all_errors = {}
    for m in minutes:
        reports = {r["strategy"]: r for r in m["reports"]}
        requests = sum(r["requests"] for r in m["reports"])
        errors = {}
        for r in m["reports"]:
            for code, n in r["errors"].items():
                errors[code] = errors.get(code, 0) + n
                all_errors[code] = all_errors.get(code, 0) + n
        lo, hi = (m["minute"] - 1) * 60, m["minute"] * 60
        window = [k for t, k in rss if lo <= t < hi]
        peak = max(window) / 1024 if window else float("nan")

        def p99(name):
            r = reports.get(name)
            return f"{r['p99_ms']:.1f} ms" if r else "-"

        err_text = ", ".join(f"{c}={n}" for c, n in sorted(errors.items())) or "none"
        print(f"{m['minute']:>3} {requests:>9} {err_text:<34} {p99('STRATEGY_ERRGROUP'):>12} "
              f"{p99('STRATEGY_MAPREDUCE'):>13} {p99('STRATEGY_BATCH_QUERY'):>10} {peak:>8.1f}")
    print("\nerrors by status, whole run:",
          ", ".join(f"{c}={n}" for c, n in sorted(all_errors.items())) or "none")
    ok = alive
    for down, up, healthy in restarts:
        when = (f"healthy {healthy:.2f} s after it was back" if healthy is not None
                else "NEVER healthy again")
        print(f"PostgreSQL down at {down:.0f} s, back at {up:.0f} s, service {when}")
        ok = ok and healthy is not None
    # Flat: the trend of every RSS sample after the first (warm-up) minute, projected over the
    # run, stays within the tolerance of the level it starts from. One noisy minute does not
    # decide it either way.
    settled = [(t, k / 1024) for t, k in rss if t >= 60]
    slope = slope_per_minute(settled)
    base = sorted(v for t, v in settled if t < 120)[len([1 for t, _ in settled if t < 120]) // 2] \
        if any(t < 120 for t, _ in settled) else float("nan")
    projected = slope * (settings["minutes"] - 1)
    flat = base == base and projected <= settings["rss_tolerance"] * base
    print(f"RSS trend after the first minute: {slope:+.2f} MiB/min, {projected:+.1f} MiB over the "
          f"run from {base:.1f} MiB ({projected / base * 100:+.1f}%, tolerance "
          f"{settings['rss_tolerance'] * 100:.0f}%): {'flat' if flat else 'NOT FLAT'}")
    if not ok:
        print("the server died or did not recover", file=sys.stderr)
    return 0 if ok and flat else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--down-seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--rss-tolerance", type=float, default=0.10)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/user-rpc"))
    ap.add_argument("--json", help="also write the run's figures to this file")
    ap.add_argument("--replay", help="print the report of a run saved with --json, run nothing")
    args = ap.parse_args()
    if args.replay:
        with open(args.replay) as f:
            saved = json.load(f)
        settings = saved.get("settings") or vars(args)
        return report(settings, saved["minutes"], saved["restarts"], saved["rss"],
                      saved.get("server_alive", True))
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `cargo build --release` first")

    work = tempfile.mkdtemp(prefix="user-rpc-soak-")
    pg = Postgres(work)
    server = None
    try:
        pg.start()
        env = dict(os.environ, DATABASE_URL=pg.url("user_rpc"), RUST_LOG="warn")
        subprocess.run([args.binary, "seed", "--count", str(args.users)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        server_log = open(os.path.join(work, "server.log"), "ab")
        server = subprocess.Popen(
            [args.binary, "serve", "--listen", listen, "--admin-listen", admin], env=env,
            stdout=server_log, stderr=server_log,
        )
        if not wait_healthy(admin):
            sys.exit("user-rpc never became healthy")

        start = time.time()
        total = args.minutes * 60
        rss = []  # (seconds since start, KiB)
        restarts = []  # (down at, up at, healthy again after)
        stop = threading.Event()

        def sample_rss():
            while not stop.is_set():
                value = rss_kib(server.pid)
                if value is not None:
                    rss.append((time.time() - start, value))
                stop.wait(2)

        def restart_postgres():
            for i in range(1, args.restarts + 1):
                at = total * i / (args.restarts + 1)
                if stop.wait(max(0, at - (time.time() - start))):
                    return
                down = time.time() - start
                pg.stop()
                time.sleep(args.down_seconds)
                pg.start()
                up = time.time() - start
                healthy = wait_healthy(admin, 60)
                restarts.append((down, up, (time.time() - start - up) if healthy else None))

        threads = [threading.Thread(target=sample_rss, daemon=True),
                   threading.Thread(target=restart_postgres, daemon=True)]
        for t in threads:
            t.start()

        minutes = []
        per_strategy = max(1, 60 // 3)
        for minute in range(args.minutes):
            out = subprocess.run(
                [args.binary, "bench", "--addr", f"http://{listen}", "--json", "--concurrency",
                 str(args.concurrency), "--batch", str(args.batch), "--duration",
                 f"{per_strategy}s", "--max-id", str(args.users), "--call-timeout-ms", "2000"],
                env=env, capture_output=True, text=True,
            )
            if out.returncode != 0:
                print(f"minute {minute + 1}: bench failed: {out.stderr.strip()}", file=sys.stderr)
                minutes.append({"minute": minute + 1, "reports": []})
                continue
            minutes.append({"minute": minute + 1, "reports": json.loads(out.stdout)})
            if server.poll() is not None:
                break
        stop.set()
        for t in threads:
            t.join(timeout=90)

        alive = server.poll() is None
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"settings": vars(args), "minutes": minutes, "restarts": restarts,
                           "rss": rss, "server_alive": alive}, f, indent=1)
        return report(vars(args), minutes, restarts, rss, alive)
    finally:
        if server and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        pg.stop(signal.SIGQUIT)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
