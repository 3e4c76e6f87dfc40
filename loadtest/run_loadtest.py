"""`make loadtest`: start a local server, drive it with locust (headless, bounded time), summarise and plot.

Scenarios: a fixed-concurrency sweep (closed loop: each user sends its next request when the last one ends) and
Poisson arrivals (each user waits an exponential time between requests). Writes into --out: one locust CSV set per
run, summary.json and summary.md (p50/p90/p99 of TTFT, inter-token latency and end-to-end latency, tokens/s,
failures, rejections), and latency.png (percentiles against concurrency).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))
from bench_throughput import _free_port, _wait_serving  # noqa: E402

ENTRIES = {"ttft": "Generate/ttft", "itl": "Generate/itl", "e2e": "Generate/total"}


def run_locust(port: int, users: int, seconds: int, prefix: Path, env: dict) -> None:
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
               "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "-H", f"grpc://127.0.0.1:{port}",
               "--only-summary", "--csv", str(prefix), "--stop-timeout", "30"]
    subprocess.run(command, check=True, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarize(prefix: Path, seconds: float, label: str, users: int) -> dict:
    rows = {row["Name"]: row for row in csv.DictReader(open(f"{prefix}_stats.csv"))}
    row = {"scenario": label, "users": users}
    for key, name in ENTRIES.items():
        stats = rows.get(name)
        for pct in ("50%", "90%", "99%"):
            value = float(stats[pct]) / 1000 if stats and stats[pct] not in ("", "N/A") else None
            row[f"{key}_p{pct[:-1]}_s"] = value
    total = rows.get(ENTRIES["e2e"])
    requests = int(total["Request Count"]) if total else 0
    row["requests"] = requests
    row["failures"] = int(total["Failure Count"]) if total else 0
    row["rejected"] = int(rows["Generate/rejected"]["Request Count"]) if "Generate/rejected" in rows else 0
    row["tokens_per_s"] = requests * float(total["Average Content Size"]) / seconds if total else 0.0
    return row


def table(rows: list[dict]) -> str:
    head = ("| scenario | users | requests | tok/s | TTFT p50/p90/p99 s | ITL p50/p90/p99 ms | e2e p50/p99 s | "
            "failed | rejected |\n|---|---|---|---|---|---|---|---|---|")

    def trio(key, scale=1.0, fmt=".2f"):
        return "/".join("-" if r is None else format(r * scale, fmt) for r in key)

    lines = [f"| {r['scenario']} | {r['users']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
             f"{trio([r['ttft_p50_s'], r['ttft_p90_s'], r['ttft_p99_s']])} | "
             f"{trio([r['itl_p50_s'], r['itl_p90_s'], r['itl_p99_s']], 1000, '.0f')} | "
             f"{trio([r['e2e_p50_s'], r['e2e_p99_s']])} | {r['failures']} | {r['rejected']} |" for r in rows]
    return "\n".join([head, *lines])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r["scenario"] == "closed"]
    users = [r["users"] for r in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title, scale in ((axes[0], "itl", "inter-token latency (ms)", 1000), (axes[1], "ttft",
                                                                                       "time to first token (s)", 1)):
        for pct in ("50", "90", "99"):
            ax.plot(users, [(r[f"{key}_p{pct}_s"] or 0) * scale for r in sweep], marker="o", label=f"p{pct}")
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--seconds", type=int, default=60, help="per run")
    parser.add_argument("--poisson-users", type=int, default=16)
    parser.add_argument("--poisson-rate", type=float, default=0.1, help="requests per second per user")
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--mix", default="mixed", choices=["short", "long", "mixed"])
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results")
    parser.add_argument("--server-args", default="--max-pending-requests 24 --max-num-batched-tokens 128",
                        help="extra flags for the server")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--metrics-port", "-1",
                               "--log-level", "WARNING", *args.server_args.split()], cwd=ROOT)
    rows = []
    try:
        _wait_serving(port, server)
        env = {"CERTKV_MAX_NEW": str(args.max_new), "CERTKV_PROMPT_MIX": args.mix}
        runs = [("closed", users, env) for users in args.concurrency]
        runs.append(("poisson", args.poisson_users, env | {"CERTKV_ARRIVALS": "poisson",
                                                           "CERTKV_RATE": str(args.poisson_rate)}))
        for label, users, run_env in runs:
            prefix = args.out / f"{label}_u{users}"
            started = time.perf_counter()
            run_locust(port, users, args.seconds, prefix, run_env)
            rows.append(summarize(prefix, time.perf_counter() - started, label, users))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=120)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    (args.out / "summary.md").write_text(table(rows) + "\n")
    plot(rows, args.out / "latency.png")
    print(table(rows))


if __name__ == "__main__":
    main()
