"""Reconcile throughput, latency, memory, CPU and idle API load of the operator on a real
Kubernetes control plane, side by side with two kopf peers: a no-op operator
(bench/noop_operator.py) and one that creates the same children as modelship with no planning
(bench/children_operator.py).

One run starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler v1.36
(tests/servers/kubeplane.py, assets from MODELSHIP_KUBE_ASSETS or ../shared/kube) with an audit
log of the operators' ServiceAccounts, applies manifests/install.yaml, starts SeaweedFS
(`weed mini`) and uploads the tiny offline model (runtime/tinymodel.py) to it. Then, for each
size, rounds alternate: the no-op operator, the children operator, then `modelship operator`
(each its own process with a ServiceAccount token, started for its round and stopped after
it). A round creates N ModelDeployments of `s3://models/tiny` at once (8 client threads) in a
fresh namespace and polls every max(0.5, N/250) s until each is reconciled: modelship's has
`status.plan` and its Deployment exists, the children operator's has `status.benchNoop` and its
Deployment exists, the no-op's has `status.benchNoop`. Latency = reconciled seen - create returned.

Figures per round: time until all are reconciled, rate (N / that time), p50/p95 latency, the
operator's RSS (peak and at the end) and CPU seconds, its API requests (audit events at stage
ResponseComplete by its ServiceAccount) per reconcile, and for modelship the steady state: its
requests per second over `--steady-seconds` with every ModelDeployment idle.

    PYTHONPATH=$PWD/.dev:$PWD python bench/reconcile_bench.py [--sizes 100,1000]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from modelship.operator.apply import DEPLOYMENT, MD_LABEL, POD, SERVICE, Kind, Kube
from modelship.runtime import demo
from modelship.runtime.tinymodel import build_tiny_model

from tests.servers.kubeplane import (
    INSTALL_YAML,
    NAMESPACE,
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    ControlPlane,
    audit_events,
    audit_policy,
    crd_schema_dir,
    free_port,
    install_crds,
    kube_assets,
    start_control_plane,
    start_operator,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
MD = Kind("modelship.dev/v1alpha1", "ModelDeployment", "modeldeployments", True)
EVENT = Kind("v1", "Event", "events", True)
NOOP_LABEL = "bench.modelship.dev/operator"
# The peers: a kopf script each, run under a ServiceAccount of their own bound to the chart's
# ClusterRole.
PEERS = {"noop": "noop_operator.py", "children": "children_operator.py"}
SERVICE_ACCOUNTS = {"modelship": OPERATOR_SERVICE_ACCOUNT} | {
    peer: f"bench-{peer}" for peer in PEERS
}
USERS = {
    which: f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}"
    for which, account in SERVICE_ACCOUNTS.items()
}
# The placeholders of the template bench/children_operator.py is given (it reads them there).
TEMPLATE_NAME, TEMPLATE_NAMESPACE = "zzbenchtemplatezz", "zzbenchnamespacezz"
TEMPLATE_UID = "11111111-2222-3333-4444-555555555555"
S3_KEY, S3_SECRET = "benchkey", "benchsecret"


@dataclass
class Audit:
    """Reads the API server's audit log (JSON lines) for one user's completed requests."""

    path: Path

    def events(self, user: str, start: float, end: float) -> list[dict[str, Any]]:
        """Completed requests by `user` received in [start, end] (wall-clock seconds)."""
        found = []
        for event in audit_events(self.path, user):
            if event.get("stage") != "ResponseComplete":
                continue
            received = datetime.datetime.fromisoformat(
                event["requestReceivedTimestamp"].replace("Z", "+00:00")
            ).timestamp()
            if start <= received <= end:
                found.append(event)
        return found


def breakdown(events: list[dict[str, Any]]) -> dict[str, int]:
    """Requests by `verb resource[/subresource]`, most first."""
    counts = collections.Counter(
        f"{e.get('verb')} {(e.get('objectRef') or {}).get('resource', e.get('requestURI', '?'))}"
        + (
            f"/{e['objectRef']['subresource']}"
            if (e.get("objectRef") or {}).get("subresource")
            else ""
        )
        for e in events
    )
    return dict(counts.most_common())


def proc_figures(pid: int) -> dict[str, float]:
    """RSS now and peak (MiB) and CPU seconds (user + system) of a process."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "peak_rss_mib": round(int(fields["VmHWM"].split()[0]) / 1024, 1),
        "cpu_seconds": round((int(stat[11]) + int(stat[12])) / ticks, 1),
    }


class PeerOperator:
    """A peer's script (PEERS) under `kopf run`, its own process with a ServiceAccount token."""

    def __init__(self, script: str, kubeconfig: Path, log_path: Path, env: dict[str, str]) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/healthz"
        kopf = Path(sys.executable).parent / "kopf"
        self.process = subprocess.Popen(
            [
                str(kopf), "run", "--standalone", "--all-namespaces",
                "--liveness", self.url, str(REPO / "bench" / script),
            ],
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
            cwd=log_path.parent,  # never the repository root (its operator/ folder)
            start_new_session=True,
        )  # fmt: skip
        wait_for(f"{script}'s liveness", self._alive, timeout_seconds=60)

    def _alive(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def create_all(kube: Kube, namespace: str, size: int, uri: str, which: str) -> dict[str, float]:
    """Create `size` ModelDeployments at once (8 threads); name -> when its create returned."""
    labels = {NOOP_LABEL: which} if which in PEERS else {}

    def one(index: int) -> tuple[str, float]:
        name = f"md-{index:04d}"
        body = {
            "apiVersion": "modelship.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"model": {"uri": uri}},
        }
        kube.request("POST", MD.path(namespace), body=body)
        return name, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, range(size)))


def render_children_template(work: Path, env: dict[str, str], uri: str) -> None:
    """What `modelship render` makes of one ModelDeployment of `uri` with the operator's
    settings, for bench/children_operator.py: placeholders for the name, namespace and uid."""
    md = {
        "apiVersion": "modelship.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": TEMPLATE_NAME},
        "spec": {"model": {"uri": uri}},
    }
    (work / "template-md.yaml").write_text(yaml.safe_dump(md))
    rendered = subprocess.run(
        [
            str(Path(sys.executable).parent / "modelship"), "render",
            "-f", str(work / "template-md.yaml"), "-n", TEMPLATE_NAMESPACE,
            "--uid", TEMPLATE_UID, "--cluster-name", env["MODELSHIP_CLUSTER_NAME"],
            "--node-role", env["MODELSHIP_NODE_ROLE"],
            "--endpoint-url", env["MODELSHIP_S3_ENDPOINT_URL"],
        ],
        env={**os.environ, **env},
        cwd=work,  # never the repository root (its operator/ folder)
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    placeholders = {"name": TEMPLATE_NAME, "namespace": TEMPLATE_NAMESPACE, "uid": TEMPLATE_UID}
    (work / "children.json").write_text(
        json.dumps({"placeholders": placeholders, "documents": documents})
    )


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p * (len(values) - 1)))] if values else float("nan")


def open_sockets(pid: int) -> int:
    """Sockets the process holds open now (its connections to the API server and S3)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return 0
    return sum(link.startswith("socket:") for link in links)


def plane_cpu(plane: ControlPlane) -> dict[str, float]:
    """CPU seconds used so far by each control-plane process (etcd, API server, controllers):
    what an operator's requests cost the cluster, beside what they cost the operator."""
    return {
        name: proc_figures(process.pid)["cpu_seconds"]
        for name, process in plane.processes.items()
        if process.poll() is None
    }


def create_unrelated(plane: ControlPlane, count: int) -> None:
    """`count` Deployments (one pod each, left Pending: no nodes) and Services that are not
    modelship's, as a shared cluster has them; returns once the controller manager has made
    every pod. An operator should not pay for them."""
    kube = plane.kube()
    namespace = "unrelated"
    plane.ensure_namespace(namespace)
    labels = {"app.kubernetes.io/name": "unrelated"}

    def create(index: int) -> None:
        name = f"app-{index}"
        pod_labels = {**labels, "app": name}
        kube.request(
            "POST",
            DEPLOYMENT.path(namespace),
            body={
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
                    },
                },
            },
        )
        kube.request(
            "POST",
            SERVICE.path(namespace),
            body={
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "labels": labels},
                "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
            },
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))
    wait_for(
        f"{count} unrelated pods",
        lambda: len(kube.list(POD, namespace, labels)) >= count,
        timeout_seconds=600,
    )


def run_round(
    plane: ControlPlane,
    audit: Audit,
    which: str,
    size: int,
    kubeconfigs: dict[str, Path],
    env: dict[str, str],
    uri: str,
    args: argparse.Namespace,
    work: Path,
    last: bool,
) -> dict[str, Any]:
    kube = plane.kube()
    namespace = f"bench-{which}-{size}"
    plane.ensure_namespace(namespace)
    # The runtime pods' ServiceAccount, as an installed namespace has it.
    kube.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        body={
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "modelship-runtime"},
        },
    )
    log = work / f"{which}-{size}.log"
    if which == "modelship":
        operator: Any = start_operator(kubeconfigs[which], env, log, identity="bench")
        wait_for("the operator to lead", lambda: (operator.healthz() or {}).get("leader"))
        pid = operator.process.pid
    else:
        template = {"BENCH_CHILDREN_TEMPLATE": str(work / "children.json")}
        operator = PeerOperator(PEERS[which], kubeconfigs[which], log, template)
        pid = operator.process.pid
    result: dict[str, Any] = {"operator": which, "size": size}
    try:
        time.sleep(2)  # watch streams established
        profiler = (
            subprocess.Popen(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "50",
                    "--format",
                    "raw",
                    "--output",
                    str(work / f"{which}-{size}.profile"),
                    "--threads",
                    "--idle",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if args.py_spy
            else None
        )
        before = proc_figures(pid)
        plane_before = plane_cpu(plane)
        result["rss_start_mib"] = before["rss_mib"]
        wall_start, started = time.time(), time.monotonic()
        created = create_all(kube, namespace, size, uri, which)
        result["create_seconds"] = round(max(created.values()) - started, 2)
        seen: dict[str, float] = {}
        peak_fds = 0
        deadline = started + args.timeout_seconds
        next_report = started + 30
        while len(seen) < size and time.monotonic() < deadline:
            now = time.monotonic()
            peak_fds = max(peak_fds, open_sockets(pid))
            if now > next_report:
                print(f"  {which} {size}: {len(seen)} after {now - started:.0f}s", flush=True)
                next_report += 30
            deployments = (
                {
                    (d["metadata"].get("labels") or {}).get(MD_LABEL)
                    for d in kube.list(DEPLOYMENT, namespace)
                }
                if which != "noop"
                else set()
            )
            for item in kube.list(MD, namespace):
                name = item["metadata"]["name"]
                status = item.get("status") or {}
                done = (
                    bool(status.get("plan")) and name in deployments
                    if which == "modelship"
                    else status.get("benchNoop") == "reconciled"
                    and (which == "noop" or name in deployments)
                )
                if done and name not in seen:
                    seen[name] = now
            # Listing N ModelDeployments and Deployments costs the API server too: at 1000 a
            # 0.5 s poll served ~20 MB/s of lists and slowed the operator under test.
            time.sleep(max(0.5, size / 250))
        wall_end = time.time()
        if profiler is not None:
            profiler.send_signal(2)  # SIGINT: py-spy writes its profile and exits
            profiler.wait(timeout=60)
        latencies = sorted(seen[name] - created[name] for name in seen)
        finished = max(seen.values()) if seen else time.monotonic()
        during = audit.events(USERS[which], wall_start, wall_end)
        figures = proc_figures(pid)
        plane_after = plane_cpu(plane)
        result["peak_open_sockets"] = peak_fds
        result["control_plane_cpu_seconds"] = {
            name: round(plane_after[name] - plane_before.get(name, 0.0), 1) for name in plane_after
        }
        result.update(
            {
                "reconciled": len(seen),
                "all_seconds": round(finished - started, 2),
                "rate_per_second": round(len(seen) / (finished - started), 1) if seen else 0.0,
                "p50_seconds": round(pct(latencies, 0.50), 2),
                "p95_seconds": round(pct(latencies, 0.95), 2),
                "max_seconds": round(latencies[-1], 2) if latencies else None,
                "mean_seconds": round(statistics.fmean(latencies), 2) if latencies else None,
                "cpu_seconds": round(figures["cpu_seconds"] - before["cpu_seconds"], 1),
                "peak_rss_mib": figures["peak_rss_mib"],
                "requests": len(during),
                "requests_per_reconcile": round(len(during) / max(1, len(seen)), 1),
                "requests_by_kind": breakdown(during),
            }
        )
        if which == "modelship" and args.steady_seconds > 0:
            time.sleep(args.settle_seconds)  # pods' scheduling failures, status settling
            cpu0, t0 = proc_figures(pid)["cpu_seconds"], time.time()
            time.sleep(args.steady_seconds)
            t1 = time.time()
            idle = audit.events(USERS[which], t0, t1)
            result["steady_requests"] = len(idle)
            result["steady_requests_per_second"] = round(len(idle) / (t1 - t0), 2)
            result["steady_requests_by_kind"] = breakdown(idle)
            result["steady_cpu_seconds"] = round(proc_figures(pid)["cpu_seconds"] - cpu0, 1)
        events = kube.list(EVENT, namespace)
        result["events_by_reason"] = dict(
            collections.Counter(
                f"{e.get('reportingComponent') or (e.get('source') or {}).get('component')} "
                f"{e.get('reason')}"
                for e in events
            ).most_common()
        )
        end = proc_figures(pid)
        result["rss_end_mib"] = end["rss_mib"]
        result["peak_rss_mib"] = end["peak_rss_mib"]
        result["total_cpu_seconds"] = end["cpu_seconds"]
        if not last:  # clean up while the operator runs (modelship's finalizers)
            kube.request("DELETE", NAMESPACE.path(None, namespace))
            wait_for(
                f"namespace {namespace} deleted",
                lambda: kube.get(NAMESPACE, None, namespace) is None,
                timeout_seconds=600,
            )
            if which == "children":
                # Its node pool outlives the namespace; left behind, modelship's round would find
                # a pool another field manager wrote, and restore it on every event.
                plane.kubectl(
                    "delete", "nodepools.karpenter.sh,ec2nodeclasses.karpenter.k8s.aws",
                    "-l", "app.kubernetes.io/managed-by=modelship",
                )  # fmt: skip
    finally:
        operator.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--operators", default="noop,children,modelship")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--settle-seconds", type=float, default=15.0)
    parser.add_argument("--timeout-seconds", type=float, default=600.0)
    parser.add_argument(
        "--resync-seconds", default="", help="MODELSHIP_RESYNC_SECONDS (default: the operator's)"
    )
    parser.add_argument(
        "--py-spy", default="", help="path of py-spy: record the operator's stacks while it works"
    )
    parser.add_argument(
        "--unrelated",
        type=int,
        default=0,
        help="first create this many Deployments (a pod each) and Services that are not modelship's",
    )
    parser.add_argument("--work", default="", help="folder for logs (default: a temporary one)")
    args = parser.parse_args()

    assets, schemas = kube_assets(), crd_schema_dir()
    if assets is None or schemas is None:
        print("no control-plane assets: set MODELSHIP_KUBE_ASSETS and MODELSHIP_CRD_SCHEMAS")
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="reconcile-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    audit = Audit(work / "audit.log")
    plane = start_control_plane(
        work / "plane",
        assets,
        audit_policy(work / "audit-policy.yaml", USERS.values()),
        audit.path,
        service_cidr="10.0.0.0/20",  # one Service per ModelDeployment: a /24 stops at ~250
    )
    seaweed = None
    results = []
    try:
        install_crds(plane, schemas, REPO / "crds")
        plane.kubectl("apply", "--server-side", "-f", str(INSTALL_YAML))
        peer_rbac = [
            document
            for peer in PEERS
            for document in (
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": SERVICE_ACCOUNTS[peer], "namespace": OPERATOR_NAMESPACE},
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": {"name": SERVICE_ACCOUNTS[peer]},
                    # The chart's own ClusterRole: the same permissions as modelship's token.
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "modelship",
                    },
                    "subjects": [
                        {
                            "kind": "ServiceAccount",
                            "name": SERVICE_ACCOUNTS[peer],
                            "namespace": OPERATOR_NAMESPACE,
                        }
                    ],
                },
            )
        ]
        (work / "peer-rbac.yaml").write_text(yaml.safe_dump_all(peer_rbac))
        plane.kubectl("apply", "-f", str(work / "peer-rbac.yaml"))
        kubeconfigs = {
            which: plane.token_kubeconfig(OPERATOR_NAMESPACE, account, work / f"{which}.kubeconfig")
            for which, account in SERVICE_ACCOUNTS.items()
        }
        seaweed = demo.start_seaweed(
            work / "s3", bucket="models", access_key=S3_KEY, secret_key=S3_SECRET
        )
        seaweed.upload_dir(build_tiny_model(work / "tiny"), "tiny")
        env = {
            "MODELSHIP_CLUSTER_NAME": "bench",
            "MODELSHIP_NODE_ROLE": "KarpenterNodeRole-bench",
            "MODELSHIP_ACTIVATOR_PORT": "0",
            "MODELSHIP_ACTIVATOR_URL": "http://127.0.0.1:1",
            "MODELSHIP_S3_ENDPOINT_URL": seaweed.endpoint_url,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "MALLOC_ARENA_MAX": "2",  # as the chart's Deployment sets it
        }
        if args.resync_seconds:
            env["MODELSHIP_RESYNC_SECONDS"] = args.resync_seconds
        render_children_template(work, env, "s3://models/tiny")
        if args.unrelated:
            create_unrelated(plane, args.unrelated)
        rounds = [
            (which, int(size))
            for size in args.sizes.split(",")
            for which in args.operators.split(",")
        ]
        for index, (which, size) in enumerate(rounds):
            result = run_round(
                plane, audit, which, size, kubeconfigs, env, "s3://models/tiny", args, work,
                last=index == len(rounds) - 1,
            )  # fmt: skip
            result["unrelated"] = args.unrelated
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        if seaweed is not None:
            seaweed.stop()
        plane.stop()
    by = {(r["operator"], r["size"]): r for r in results}
    for size in sorted({r["size"] for r in results}):
        for first, second in (
            ("modelship", "noop"),
            ("modelship", "children"),
            ("children", "noop"),
        ):
            one, other = by.get((first, size)), by.get((second, size))
            if one and other and other["rate_per_second"]:
                ratio = one["rate_per_second"] / other["rate_per_second"]
                print(f"{size}: {first}/{second} rate ratio {ratio:.2f}")
    print(f"logs: {work}")
    return 0 if all(r["reconciled"] == r["size"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
