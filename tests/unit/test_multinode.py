"""Multi-node serving helpers (runtime/multinode.py): the Ray command lines, the leader's wait for
every node, the worker's leader address, and the runtime's --role/--nodes options."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from modelship.runtime.main import parse_args
from modelship.runtime.multinode import (
    EXECUTOR_FLAG,
    MultiNodeError,
    NodeCount,
    count_alive_nodes,
    find_ray,
    leader_engine_args,
    node_probe_command,
    probe_nodes,
    ray_address,
    ray_head_command,
    ray_worker_command,
    resolve_leader_address,
    should_retry_join,
    wait_for_nodes,
)

BASE = ["--source", "s3://models/llama-405b", "--model-dir", "/models/llama-405b"]


# --- command lines ---------------------------------------------------------------------------


def test_head_and_worker_commands_follow_the_vllm_recipe() -> None:
    assert ray_head_command("/venv/bin/ray") == [
        "/venv/bin/ray",
        "start",
        "--head",
        "--port=6379",
        "--disable-usage-stats",
        "--block",
    ]
    assert ray_worker_command("/venv/bin/ray", "llama-lws-0.llama-lws.serving:6379") == [
        "/venv/bin/ray",
        "start",
        "--address=llama-lws-0.llama-lws.serving:6379",
        "--disable-usage-stats",
        "--block",
    ]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("llama-lws-0.llama-lws.serving", "llama-lws-0.llama-lws.serving:6379"),
        ("10.0.3.7:7000", "10.0.3.7:7000"),
        ("fd00::7", "[fd00::7]:6379"),
        ("[fd00::7]", "[fd00::7]:6379"),
        ("[fd00::7]:7000", "[fd00::7]:7000"),
    ],
)
def test_ray_address(host: str, expected: str) -> None:
    assert ray_address(host) == expected


def test_leader_engine_args_add_the_ray_executor_once() -> None:
    plan = ["--tensor-parallel-size", "8", "--pipeline-parallel-size", "2"]
    assert leader_engine_args(plan) == [*plan, EXECUTOR_FLAG, "ray"]
    assert leader_engine_args([*plan, EXECUTOR_FLAG, "ray"]) == [*plan, EXECUTOR_FLAG, "ray"]
    assert leader_engine_args([*plan, f"{EXECUTOR_FLAG}=ray"]) == [*plan, f"{EXECUTOR_FLAG}=ray"]


@pytest.mark.parametrize("args", [[EXECUTOR_FLAG, "mp"], [f"{EXECUTOR_FLAG}=mp"], [EXECUTOR_FLAG]])
def test_leader_refuses_another_executor(args: list[str]) -> None:
    with pytest.raises(MultiNodeError, match="set it to ray"):
        leader_engine_args(["--tensor-parallel-size", "8", *args])


def test_find_ray_prefers_the_one_next_to_python(tmp_path: Path) -> None:
    venv_bin, other_bin = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    for directory in (venv_bin, other_bin):
        directory.mkdir(parents=True)
        (directory / "ray").write_text("#!/bin/sh\n")
        (directory / "ray").chmod(stat.S_IRWXU)
    assert find_ray(str(venv_bin / "python"), path=str(other_bin)) == str(venv_bin / "ray")
    assert find_ray(str(tmp_path / "python"), path=str(other_bin)) == str(other_bin / "ray")
    with pytest.raises(MultiNodeError, match="GPU runtime image"):
        find_ray(str(tmp_path / "python"), path=str(tmp_path))


# --- the worker's leader address ---------------------------------------------------------------


def test_leader_address_from_the_command_line_or_the_lws_environment() -> None:
    env = {"LWS_LEADER_ADDRESS": "llama-lws-0.llama-lws.serving"}
    assert resolve_leader_address("10.0.0.5", env) == "10.0.0.5"
    # The kubelet leaves $(VAR) as is when VAR is not in the container's env at start.
    assert resolve_leader_address("$(LWS_LEADER_ADDRESS)", env) == env["LWS_LEADER_ADDRESS"]
    assert resolve_leader_address(None, env) == env["LWS_LEADER_ADDRESS"]
    with pytest.raises(MultiNodeError, match=r"\$LWS_LEADER_ADDRESS is empty"):
        resolve_leader_address("$(LWS_LEADER_ADDRESS)", {})


# --- counting nodes ----------------------------------------------------------------------------


def test_count_alive_nodes_reads_the_last_json_line() -> None:
    nodes = [
        {"alive": True, "address": "10.0.0.1"},
        {"alive": True, "address": "10.0.0.2"},
        {"alive": False, "address": "10.0.0.3"},  # a worker that left before the restart
    ]
    output = "2025-01-01 INFO worker.py:1 -- Connecting to existing Ray cluster\n" + json.dumps(
        nodes
    )
    assert count_alive_nodes(output) == 2
    with pytest.raises(ValueError, match="no node list"):
        count_alive_nodes("ConnectionError: could not find any running Ray instance")


def test_probe_nodes_runs_a_real_child(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, sys\n"
        "print('connecting', file=sys.stderr)\n"
        "print(json.dumps([{'alive': True}, {'alive': True}, {'alive': True}]))\n"
    )
    assert probe_nodes([sys.executable, str(script)]) == NodeCount(3)
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nsys.exit('ConnectionError: no Ray cluster at auto')\n")
    count = probe_nodes([sys.executable, str(failing)])
    assert count.alive == 0
    assert count.error is not None and "no Ray cluster at auto" in count.error


def test_the_probe_script_is_valid_python() -> None:
    command = node_probe_command(sys.executable, "auto")
    compile(command[2], "<probe>", "exec")
    assert "ray.nodes()" in command[2] and "address='auto'" in command[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_for_nodes_returns_when_every_node_is_alive() -> None:
    clock = FakeClock()
    looks = iter([NodeCount(0, "no Ray cluster yet"), NodeCount(1), NodeCount(2), NodeCount(3)])
    seen: list[int] = []
    alive = wait_for_nodes(
        3,
        lambda: next(looks),
        timeout_seconds=60,
        interval_seconds=5,
        on_progress=lambda count: seen.append(count.alive),
        clock=clock,
        sleep=clock.sleep,
    )
    assert alive == 3
    assert seen == [0, 1, 2]
    assert clock.now == 15


def test_wait_for_nodes_names_the_missing_count_after_the_timeout() -> None:
    clock = FakeClock()
    with pytest.raises(MultiNodeError) as raised:
        wait_for_nodes(
            4,
            lambda: NodeCount(2),
            timeout_seconds=12,
            interval_seconds=5,
            clock=clock,
            sleep=clock.sleep,
        )
    message = str(raised.value)
    assert "2 of 4 node(s) missing" in message and "after 12 s" in message
    assert "--nodes-timeout-seconds" in message
    assert clock.now == 12  # the last sleep is cut to the deadline


def test_wait_for_nodes_gives_up_when_check_raises() -> None:
    def head_exited() -> None:
        raise MultiNodeError("the Ray head exited with code 1")

    with pytest.raises(MultiNodeError, match="head exited"):
        wait_for_nodes(2, lambda: NodeCount(1), timeout_seconds=60, check=head_exited)


def test_a_worker_retries_only_failed_joins_within_the_timeout() -> None:
    assert should_retry_join(1, first_attempt_at=0, now=10, timeout_seconds=300)
    assert not should_retry_join(0, first_attempt_at=0, now=10, timeout_seconds=300)
    assert not should_retry_join(1, first_attempt_at=0, now=300, timeout_seconds=300)


# --- the runtime's options ---------------------------------------------------------------------


def test_role_options_from_the_command_line_and_the_environment() -> None:
    leader, _ = parse_args([*BASE, "--role", "leader", "--nodes", "2"], env={})
    assert (leader.role, leader.nodes, leader.ray_port) == ("leader", 2, 6379)
    # The nodes timeout defaults to the ready timeout: workers fetch the weights first.
    assert leader.nodes_timeout_seconds == leader.ready_timeout_seconds
    env = {
        "MODELSHIP_RUNTIME_ROLE": "worker",
        "MODELSHIP_RUNTIME_NODES": "3",
        "MODELSHIP_RUNTIME_LEADER_ADDRESS": "10.0.0.5",
        "MODELSHIP_RUNTIME_NODES_TIMEOUT_SECONDS": "900",
    }
    worker, _ = parse_args(BASE, env=env)
    assert (worker.role, worker.nodes, worker.leader_address) == ("worker", 3, "10.0.0.5")
    assert worker.nodes_timeout_seconds == 900
    single, _ = parse_args(BASE, env={})
    assert (single.role, single.nodes) == (None, 1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--role", "leader"], "--role leader needs --nodes 2"),
        (["--nodes", "2"], "--nodes 2 needs --role"),
        (["--role", "boss", "--nodes", "2"], "invalid choice: 'boss'"),
    ],
)
def test_inconsistent_role_options_are_refused(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args([*BASE, *extra], env={})
    assert message in capsys.readouterr().err


def test_a_worker_without_ray_fails_with_a_plain_error(tmp_path: Path) -> None:
    """The real entry point as a worker on this image (no ray): the fetch and verify run, then
    one `error:` line says to use the GPU image; the status file says failed."""
    from modelship.runtime.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    status_file = tmp_path / "status.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelship.runtime.main",
            "--source",
            f"file://{model}",
            "--model-dir",
            str(tmp_path / "unused"),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--status-file",
            str(status_file),
            "--role",
            "worker",
            "--nodes",
            "2",
            "--leader-address",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(tmp_path)},  # no `ray` anywhere on it
        check=False,
    )
    if Path(sys.executable).with_name("ray").exists():
        pytest.skip("ray is installed next to this Python")
    assert done.returncode == 1, done.stderr
    assert "error: join the Ray cluster failed: ray: not installed" in done.stderr
    status = json.loads(status_file.read_text())
    assert status["phase"] == "failed" and status["role"] == "worker"
    assert status["leader"] == "127.0.0.1:6379"
