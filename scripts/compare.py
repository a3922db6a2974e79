#!/usr/bin/env python3
"""Side-by-side benchmark: PostgreSQL's own ceiling (pgbench) against each user-rpc strategy.

One run, one database, the same data (100k users) and the same machine:
  1. pgbench -M prepared, 8 clients, random ids drawn per transaction:
     one primary-key lookup per transaction, and WHERE id = ANY(<100 ids>);
  2. `user-rpc serve` (release build) loaded by `user-rpc bench`, batches of 100, each strategy at
     8 and 32 concurrent callers, with the server's RSS sampled while it runs;
  3. medians over --repeat runs, and the ratios BATCH_QUERY / pgbench ANY(100) and
     ERRGROUP, MAPREDUCE / pgbench single-PK (users/s).

Usage: python3 scripts/compare.py [--seconds 10] [--repeat 3] [--no-build]
Prints a Markdown report (paste it into BENCHMARKS.md). Needs PostgreSQL and pgbench.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

USERS = 100_000
BATCH = 100
PGBENCH_CLIENTS = 8
SERVICE_CONCURRENCY = (8, 32)
STRATEGIES = ("errgroup", "mapreduce", "batch-query")


def log(message):
    print(message, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pgbench(url, script, seconds):
    """Transactions per second of one pgbench run of `script`."""
    out = subprocess.run(
        ["pgbench", "-n", "-M", "prepared", "-c", str(PGBENCH_CLIENTS), "-j", "2",
         "-T", str(seconds), "-f", script, url],
        check=True, capture_output=True, text=True,
    ).stdout
    match = re.search(r"tps = ([0-9.]+)", out)
    if not match:
        raise RuntimeError(f"no tps in pgbench output:\n{out}")
    return float(match.group(1))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Largest RSS of `pid` while running."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs to take the median of")
    parser.add_argument("--database-url",
                        default="postgres://postgres@127.0.0.1:5432/user_rpc_bench")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    args = parser.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = os.path.join(root, "target", "release", "user-rpc")
    if not args.no_build:
        log("building the release binary...")
        subprocess.run(["cargo", "build", "--release", "--bin", "user-rpc"], cwd=root, check=True)
    env = dict(os.environ, DATABASE_URL=args.database_url, RUST_LOG="warn")

    server_url, dbname = args.database_url.rsplit("/", 1)
    log(f"fresh database {dbname} with {USERS} users...")
    subprocess.run(["psql", f"{server_url}/postgres", "-qc", f'DROP DATABASE IF EXISTS "{dbname}"'],
                   check=True, capture_output=True)
    subprocess.run([binary, "seed", "--count", str(USERS)], env=env, check=True,
                   capture_output=True)
    max_id = int(subprocess.run(["psql", args.database_url, "-Atc", "SELECT max(id) FROM users"],
                                check=True, capture_output=True, text=True).stdout)

    scripts = tempfile.mkdtemp(prefix="user-rpc-pgbench-")
    single = os.path.join(scripts, "single.sql")
    with open(single, "w") as f:
        f.write(f"\\set id random(1, {max_id})\n"
                "SELECT id, name, email, created_at FROM users WHERE id = :id;\n")
    any100 = os.path.join(scripts, "any100.sql")
    with open(any100, "w") as f:
        for i in range(BATCH):
            f.write(f"\\set id{i} random(1, {max_id})\n")
        ids = ", ".join(f":id{i}" for i in range(BATCH))
        f.write(f"SELECT id, name, email, created_at FROM users WHERE id = ANY(ARRAY[{ids}]::bigint[]);\n")

    port, admin = free_port(), free_port()
    server = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
        env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        idle_rss = rss_kib(server.pid)
        runs = {"pg_single": [], "pg_any100": []}
        for rep in range(args.repeat):
            log(f"run {rep + 1}/{args.repeat}: pgbench single-PK and ANY({BATCH})...")
            runs["pg_single"].append(pgbench(args.database_url, single, args.seconds))
            runs["pg_any100"].append(pgbench(args.database_url, any100, args.seconds) * BATCH)
            for concurrency in SERVICE_CONCURRENCY:
                for strategy in STRATEGIES:
                    log(f"run {rep + 1}/{args.repeat}: {strategy} x{concurrency}...")
                    sampler = RssSampler(server.pid)
                    sampler.start()
                    out = subprocess.run(
                        [binary, "bench", "--addr", f"http://127.0.0.1:{port}", "--json",
                         "--strategy", strategy, "--concurrency", str(concurrency),
                         "--batch", str(BATCH), "--max-id", str(max_id),
                         "--duration", f"{args.seconds}s"],
                        env=env, check=True, capture_output=True, text=True).stdout
                    sampler.stop.set()
                    sampler.join()
                    report = json.loads(out)[0]
                    report["rss_mib"] = sampler.peak / 1024
                    runs.setdefault((strategy, concurrency), []).append(report)
    finally:
        server.terminate()
        server.wait(timeout=30)

    med = statistics.median
    single_users = med(runs["pg_single"])
    any_users = med(runs["pg_any100"])
    print(f"Command: `python3 scripts/compare.py --seconds {args.seconds} --repeat {args.repeat}`"
          f" — medians of {args.repeat} runs, {USERS} users, random ids, batches of {BATCH}.\n")
    print("| PostgreSQL alone (pgbench -M prepared, 8 clients) | users/s |")
    print("|---|---:|")
    print(f"| one primary-key lookup per transaction | {single_users:,.0f} |")
    print(f"| `WHERE id = ANY(...)` with {BATCH} ids | {any_users:,.0f} |\n")
    print(f"Server RSS when idle: {idle_rss / 1024:.1f} MiB.\n")
    print("| strategy | callers | users/s | p50 ms | p99 ms | errors | peak RSS MiB | ratio | of |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for concurrency in SERVICE_CONCURRENCY:
        for strategy in STRATEGIES:
            reports = runs[(strategy, concurrency)]
            users = med(r["users_per_second"] for r in reports)
            p50 = med(r["p50_ms"] for r in reports)
            p99 = med(r["p99_ms"] for r in reports)
            errors = sum(sum(r["errors"].values()) for r in reports)
            rss = max(r["rss_mib"] for r in reports)
            if strategy == "batch-query":
                ratio, base = users / any_users, f"pgbench ANY({BATCH})"
            else:
                ratio, base = users / single_users, "pgbench single-PK"
            print(f"| {strategy} | {concurrency} | {users:,.0f} | {p50:.2f} | {p99:.2f} | {errors} "
                  f"| {rss:.1f} | {ratio:.0%} | {base} |")


if __name__ == "__main__":
    main()
