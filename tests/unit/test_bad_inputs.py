"""The bad-input corpus (tests/unit/bad_inputs.py) through the API validation, `modelship plan`,
`modelship render` and the operator's source policy: every input is refused with a message that
names its field, and nothing crashes."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml
from modelship.operator import cli
from modelship.operator.api import SpecError, load_manifest
from modelship.operator.config import load_config
from modelship.operator.policy import refuse_disallowed_source
from modelship.runtime.tinymodel import build_tiny_model

from tests.unit.bad_inputs import BAD_INPUTS, BadInput, apply_patch, base_manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("corpus") / "tiny")


def _document(entry: BadInput, tiny: Path) -> dict[str, object]:
    return apply_patch(base_manifest(f"file://{tiny}"), entry.patch)


# `render` needs a node pool mode it can render without a cluster's names.
RENDER_FLAGS = ["--node-pool-mode", "none"]


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    if argv[0] == "render":
        argv = [*argv, *RENDER_FLAGS]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_corpus_is_well_formed() -> None:
    ids = [entry.id for entry in BAD_INPUTS]
    assert len(ids) == len(set(ids))
    assert len(BAD_INPUTS) >= 60


def test_the_base_manifest_is_valid(tiny: Path, tmp_path: Path) -> None:
    # Otherwise every refusal below could come from the base, not from the entry.
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base_manifest(f"file://{tiny}")))
    for command in ("plan", "render"):
        code, _, err = _run_cli([command, "-f", str(path)])
        assert code == cli.EXIT_OK, err


@pytest.mark.parametrize("entry", [e for e in BAD_INPUTS if e.stage == "api"], ids=lambda e: e.id)
def test_api_validation_names_the_field(entry: BadInput, tiny: Path) -> None:
    with pytest.raises(SpecError) as error:
        load_manifest(_document(entry, tiny))
    assert error.value.field.startswith(entry.field), (error.value.field, str(error.value))
    assert error.value.message


@pytest.mark.parametrize("command", ["plan", "render"])
@pytest.mark.parametrize(
    "entry", [e for e in BAD_INPUTS if e.stage != "operator"], ids=lambda e: e.id
)
def test_the_cli_refuses_naming_the_field(
    entry: BadInput, command: str, tiny: Path, tmp_path: Path
) -> None:
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump(_document(entry, tiny)))
    code, out, err = _run_cli([command, "-f", str(path)])
    assert code == cli.EXIT_BAD_INPUT, (out, err)
    assert f"modelship: error: {entry.field}" in err, err
    assert "Traceback" not in err
    assert out == ""  # nothing rendered or planned for a bad input


@pytest.mark.parametrize(
    "entry", [e for e in BAD_INPUTS if e.stage == "operator"], ids=lambda e: e.id
)
def test_the_operator_policy_refuses_what_the_cli_accepts(entry: BadInput, tiny: Path) -> None:
    _, spec = load_manifest(_document(entry, tiny))  # valid for the API and the CLI
    with pytest.raises(SpecError) as error:
        refuse_disallowed_source(spec, load_config({}))
    assert error.value.field == entry.field
