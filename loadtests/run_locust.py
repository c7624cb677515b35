"""The Locust scenario headless, bounded in users and time; fails if any request fails.

    .venv/bin/python loadtests/run_locust.py                       # 8 users for 60 s on a gateway it starts
    .venv/bin/python loadtests/run_locust.py --find-max --time 300  # the most users with p99 TTFT < 1 s, then 5 min
    .venv/bin/python loadtests/run_locust.py --host http://127.0.0.1:8000 --users 16 --time 120

Without --host it starts `patchserve serve` (vLLM engine unless PATCHSERVE_ENGINE says otherwise) on a
fresh data directory and free ports, and stops it after. Writes Locust's CSVs under
loadtests/results/locust/ and a summary (loadtests/results/locust_summary.json), prints it, and exits
1 if any request failed. --find-max first runs short steps of 4, 8, 16, 32, … users and keeps the
highest whose p99 time to first token stayed under --ttft-slo-ms with no failure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtests" / "results"
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
sys.path.insert(0, str(REPO))

from tests.gateway_server import GatewayProcess  # noqa: E402


def run(host: str, admin_key: str, users: int, duration: str, prefix: Path) -> dict:
    """One headless Locust run; its figures from the stats CSV."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATCHSERVE_ADMIN_KEY": admin_key}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "-u", str(users), "-r", str(max(1, users // 2)), "-t", duration, "--csv", str(prefix),
           "--only-summary", "--stop-timeout", "60", "--loglevel", "WARNING"]
    print(f"run_locust: {users} users for {duration} …", flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    summary = summarise(prefix, users, duration)
    summary["locust_exit_code"] = done.returncode
    if done.returncode not in (0, 1):  # 1: some request failed (in the CSV); anything else: locust broke
        raise SystemExit(f"run_locust: locust exited {done.returncode}: {done.stderr[-3000:]}")
    return summary


def summarise(prefix: Path, users: int, duration: str) -> dict:
    """Requests, failures, throughput and latency percentiles by request type from Locust's CSVs."""
    with open(f"{prefix}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    by_type: dict[str, dict] = {}
    for row in rows:
        if row["Name"] == "Aggregated":
            continue
        kind = row["Type"] if row["Type"] in ("TTFT", "E2E", "JOB") else \
            ("admin" if row["Name"].startswith("admin:") else "inference")
        entry = by_type.setdefault(kind, {"requests": 0, "failures": 0, "rows": []})
        entry["requests"] += int(row["Request Count"])
        entry["failures"] += int(row["Failure Count"])
        entry["rows"].append(row)
    total = next(r for r in rows if r["Name"] == "Aggregated")
    failures = []
    if Path(f"{prefix}_failures.csv").exists():
        with open(f"{prefix}_failures.csv") as f:
            failures = [{"name": r["Name"], "error": r["Error"], "count": int(r["Occurrences"])}
                        for r in csv.DictReader(f)]
    out = {"users": users, "duration": duration, "failures": failures,
           "requests": int(total["Request Count"]) - sum(v["requests"] for k, v in by_type.items()
                                                         if k in ("TTFT", "E2E", "JOB")),
           "failed": sum(v["failures"] for v in by_type.values()),
           "inference_rps": sum(float(r["Requests/s"]) for r in by_type.get("inference", {}).get("rows", [])),
           "operator_actions": {r["Name"]: int(r["Request Count"]) for r in by_type.get("admin", {}).get("rows", [])}}
    for kind in ("TTFT", "E2E"):
        rows_of = by_type.get(kind, {}).get("rows", [])
        if rows_of:  # the worst alias's percentile: what the slowest tenant sees
            out[f"{kind.lower()}_p50_ms"] = max(_ms(r["50%"]) for r in rows_of)
            out[f"{kind.lower()}_p99_ms"] = max(_ms(r["99%"]) for r in rows_of)
    return out


def _ms(value: str) -> float:
    return float(value) if value not in ("", "N/A") else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="A running gateway (default: start one).")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--time", default="60s", help="Locust's run time, like 60s or 5m.")
    parser.add_argument("--find-max", action="store_true", help="First find the most users within the TTFT SLO.")
    parser.add_argument("--step-time", default="60s", help="Length of each --find-max step.")
    parser.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "locust_summary.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="patchserve-locust-") as tmp:
        gateway = None
        if not args.host:
            engine = os.environ.get("PATCHSERVE_ENGINE", "vllm")
            print(f"run_locust: starting a gateway ({engine} engine) …", flush=True)
            gateway = GatewayProcess(Path(os.environ.get("PATCHSERVE_KIT_DIR", REPO / ".patchserve" / "kit")),
                                     engine, Path(tmp)).start(timeout=600)
        try:
            host = args.host or gateway.url
            key = os.environ.get("PATCHSERVE_ADMIN_KEY") or (gateway.admin_key if gateway else "")
            steps, users = [], args.users
            if args.find_max:
                users = 0
                for step_users in (4, 8, 16, 32, 64, 128, 256, 512, 1024):
                    step = run(host, key, step_users, args.step_time, RESULTS / "locust" / f"step{step_users}")
                    steps.append(step)
                    print(f"  {step_users} users: p99 TTFT {step.get('ttft_p99_ms')} ms, "
                          f"{step['inference_rps']:.1f} req/s, {step['failed']} failed", flush=True)
                    if step["failed"] or not step.get("ttft_p99_ms", 1e9) < args.ttft_slo_ms:
                        break
                    users = step_users
                if users == 0:
                    raise SystemExit("run_locust: even 4 users exceed the TTFT SLO on this machine")
            summary = run(host, key, users, args.time, RESULTS / "locust" / "run")
            summary["steps"] = steps
            summary["ttft_slo_ms"] = args.ttft_slo_ms
            summary["engine"] = gateway.env["PATCHSERVE_ENGINE"] if gateway else "external"
        finally:
            if gateway:
                gateway.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=2))
    print(f"run_locust: {summary['requests']} requests, {summary['failed']} failed; "
          f"p50/p99 TTFT {summary.get('ttft_p50_ms')}/{summary.get('ttft_p99_ms')} ms at {summary['users']} users "
          f"({summary['inference_rps']:.1f} req/s); summary in {args.out}")
    sys.exit(1 if summary["failed"] else 0)


if __name__ == "__main__":
    main()
