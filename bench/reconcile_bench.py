"""Reconcile throughput and latency of the operator against KMock, for 1, 100 and 1000
ModelDeployments, and the operator's memory at 1000.

The operator runs as its own process (`run_operator`, what `modelship operator` runs), pointed at
KMock's emulator (tests/servers/kube.py) on 127.0.0.1 in this process. Each round creates N
ModelDeployments (one client, as fast as the API answers) in a fresh namespace and polls until
every one has its status written (plan and phase); latency = status seen - create returned.
The tiny offline model is served from file:// so inspection reads a real config.json and
safetensors header each time.

    .venv/bin/python bench/reconcile_bench.py [--sizes 1,100,1000] [--resync-seconds 60]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes
from modelship.operator.apply import Kind, Kube
from modelship.runtime.tinymodel import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
MD = Kind("modelship.dev/v1alpha1", "ModelDeployment", "modeldeployments", True)


def _load_kube_server() -> Any:
    # The repository root cannot go on sys.path (its operator/ would shadow the stdlib module).
    spec = importlib.util.spec_from_file_location(
        "modelship_kube_server", ROOT / "tests/servers/kube.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def run_round(kube: Kube, size: int, model_uri: str, timeout_seconds: float) -> dict[str, Any]:
    namespace = f"bench-{size}"
    created: dict[str, float] = {}
    seen: dict[str, float] = {}
    started = time.monotonic()
    for index in range(size):
        name = f"md-{index:04d}"
        body = {
            "apiVersion": "modelship.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"uri": model_uri}},
        }
        kube.request("POST", MD.path(namespace), body=body)
        created[name] = time.monotonic()
    deadline = time.monotonic() + timeout_seconds
    next_report = time.monotonic() + 30
    while len(seen) < size and time.monotonic() < deadline:
        if time.monotonic() > next_report:  # partial figures survive an interrupted round
            print(
                f"  {size}: {len(seen)} reconciled after {time.monotonic() - started:.0f}s",
                flush=True,
            )
            next_report += 30
        now = time.monotonic()
        for item in kube.list(MD, namespace):
            name = item["metadata"]["name"]
            status = item.get("status") or {}
            if name not in seen and status.get("plan") and status.get("phase"):
                seen[name] = now
        # Listing N objects costs the emulator (in this process) O(N): poll less often when big.
        time.sleep(max(0.2, size / 500))
    latencies = sorted(seen[name] - created[name] for name in seen)
    last = max(seen.values()) if seen else time.monotonic()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, round(p * (len(latencies) - 1)))]
            if latencies
            else float("nan")
        )

    return {
        "size": size,
        "reconciled": len(seen),
        "create_seconds": round(max(created.values()) - started, 2),
        "p50_seconds": round(pct(0.50), 2),
        "p95_seconds": round(pct(0.95), 2),
        "max_seconds": round(latencies[-1], 2) if latencies else None,
        "mean_seconds": round(statistics.fmean(latencies), 2) if latencies else None,
        "throughput_per_second": round(len(seen) / (last - started), 1) if seen else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,100,1000")
    parser.add_argument("--resync-seconds", type=float, default=60.0)
    parser.add_argument("--timeout-seconds", type=float, default=900.0)
    args = parser.parse_args()

    server = _load_kube_server()
    ready, stop = threading.Event(), threading.Event()
    holder: dict[str, Any] = {}
    threading.Thread(target=server._serve, args=(ready, holder, stop), daemon=True).start()
    ready.wait(30)
    api = holder["api"]
    work = Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
    kubeconfig = server.write_kubeconfig(api.url, work / "kubeconfig")
    model = build_tiny_model(work / "tiny")
    kube = Kube(kubernetes.config.new_client_from_config(str(kubeconfig)))

    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "MODELSHIP_CLUSTER_NAME": "bench",
        "MODELSHIP_NODE_ROLE": "KarpenterNodeRole-bench",
        "MODELSHIP_RESYNC_SECONDS": str(args.resync_seconds),
        "MODELSHIP_ACTIVATOR_PORT": "0",  # the benchmark measures reconciles only
    }
    command = (
        "from modelship.operator.handlers import run_operator; "
        "raise SystemExit(run_operator(['--standalone', '--metrics-port', '0', '--liveness', '']))"
    )
    log = (work / "operator.log").open("wb")
    operator = subprocess.Popen(
        [sys.executable, "-c", command], env=env, stdout=log, stderr=log, cwd=work
    )
    results = []
    try:
        time.sleep(3)  # kopf start-up: discovery, watch streams
        for size in (int(s) for s in args.sizes.split(",")):
            result = run_round(kube, size, f"file://{model}", args.timeout_seconds)
            rss, peak = _rss_kib(operator.pid)
            result["operator_rss_mib"] = round(rss / 1024, 1)
            result["operator_peak_rss_mib"] = round(peak / 1024, 1)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        operator.terminate()
        operator.wait(30)
        stop.set()
    print(f"operator log: {work / 'operator.log'}")
    return 0 if all(r["reconciled"] == r["size"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
