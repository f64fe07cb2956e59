"""Every example in manifests/examples previews offline, as the quickstart says: `modelship plan -f`
and `render -f` exit 0 with no AWS credentials, no cluster and no flags, plan the hardware the
example's `# plan:` comment names, and say in one stderr line that the files were not read."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from modelship.operator.api import load_manifest
from modelship.operator.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"
NAMES = sorted(path.stem for path in EXAMPLES.glob("*.yaml"))
PLAN_COMMENT = re.compile(r"^# plan: (?P<instance>\S+) x(?P<count>\d+)", re.MULTILINE)
AWS_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)
OFFLINE = {
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
    "KUBECONFIG": "/nonexistent/kubeconfig",
}


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS credentials of any kind, no instance metadata, no kubeconfig."""
    for name in AWS_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_there_are_examples() -> None:
    assert len(NAMES) >= 9


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", NAMES)
def test_example_plans_offline_to_its_stated_hardware(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = EXAMPLES / f"{name}.yaml"
    text = path.read_text()
    load_manifest(yaml.safe_load(text))  # kind, apiVersion, metadata.name and the spec
    expected = PLAN_COMMENT.search(text)
    assert expected, f"{name}.yaml: add a '# plan: <instance type> x<accelerators>' comment"
    code, out, err = run(capsys, "plan", "-f", str(path), "-o", "json")
    assert code == 0, err
    chosen = json.loads(out)["chosen"]
    got = (chosen["instanceType"], chosen["acceleratorCount"])
    assert got == (expected["instance"], int(expected["count"])), f"{name}: planned {got}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelship: cannot read "), err
    assert "planning from the published config.json of" in lines[0]


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", NAMES)
def test_example_renders_offline_without_flags(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    code, out, err = run(capsys, "render", "-f", str(EXAMPLES / f"{name}.yaml"))
    assert code == 0, err
    documents = [d for d in yaml.safe_load_all(out) if d]
    kinds = [d["kind"] for d in documents]
    assert {"Deployment", "Service", "NodePool", "EC2NodeClass"} <= set(kinds), kinds
    node_class = next(d for d in documents if d["kind"] == "EC2NodeClass")
    assert node_class["spec"]["role"] == "REPLACE-ME-node-role"
    assert "REPLACE-ME-cluster-name (--cluster-name)" in err
    assert "MODELSHIP_" not in err


def test_the_quickstart_preview_runs_as_a_command_offline() -> None:
    # The real entry point in a fresh process, with nothing of this machine's AWS setup.
    env = {k: v for k, v in os.environ.items() if k not in AWS_CREDENTIALS} | OFFLINE
    example = "manifests/examples/llama-3.1-8b-bf16.yaml"
    for command in ("plan", "render"):
        result = subprocess.run(
            [sys.executable, "-m", "modelship.operator.cli", command, "-f", example],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "NoCredentialsError: Unable to locate credentials" in result.stderr
        assert "Traceback" not in result.stderr
    assert (
        "g6e.xlarge"
        in subprocess.run(
            [sys.executable, "-m", "modelship.operator.cli", "plan", "-f", example],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )


def test_examples_cover_the_documented_cases() -> None:
    specs = {p.stem: yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES.glob("*.yaml")}
    uris = [s["model"]["uri"] for s in specs.values()]
    assert any(u.startswith("fsx://") for u in uris) and any(u.startswith("efs://") for u in uris)
    families = {s.get("accelerator", {}).get("family") for s in specs.values()}
    assert {"inferentia", "trainium", "nvidia"} <= families
    assert any(s["model"].get("task") == "embed" for s in specs.values())
    assert any(s["model"].get("quantization", "").startswith("int4") for s in specs.values())
    assert any(s.get("replicas", {}).get("max", 1) > 1 for s in specs.values())
    # Volume models name the published facts the operator plans from when it cannot read them.
    for spec in specs.values():
        if spec["model"]["uri"].startswith(("fsx://", "efs://")):
            assert spec["model"]["architecture"]["knownModel"]


@pytest.mark.usefixtures("offline")
def test_the_readme_and_quickstart_commands_preview_offline(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the commands name files relative to the checkout
    commands = [
        line
        for doc in ("README.md", "docs/quickstart.md")
        for line in re.findall(r"`?(modelship (?:plan|render) [^`#\n]+)", (REPO / doc).read_text())
    ]
    assert len(commands) >= 4, commands
    for command in commands:
        code, out, err = run(capsys, *command.split()[1:])
        assert code == 0, f"{command}: {err}"
        assert out
