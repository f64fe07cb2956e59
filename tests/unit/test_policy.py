"""The operator refuses file:// sources unless its configuration allows them."""

from __future__ import annotations

import pytest
from modelship.operator.api import ModelDeploymentSpec, SpecError, load_spec
from modelship.operator.config import load_config
from modelship.operator.policy import refuse_disallowed_source


def _spec(uri: str) -> ModelDeploymentSpec:
    return load_spec({"model": {"uri": uri}})


def test_file_sources_are_refused_by_default_naming_the_field_and_the_setting() -> None:
    config = load_config({})
    assert config.allow_file_sources is False
    with pytest.raises(SpecError) as error:
        refuse_disallowed_source(_spec("file:///etc"), config)
    assert error.value.field == "spec.model.uri"
    assert "s3://" in error.value.message
    assert "MODELSHIP_ALLOW_FILE_SOURCES" in error.value.message


def test_the_operator_config_can_allow_them() -> None:
    config = load_config({"MODELSHIP_ALLOW_FILE_SOURCES": "true"})
    refuse_disallowed_source(_spec("file:///models/tiny"), config)


@pytest.mark.parametrize("uri", ["s3://bucket/model/", "fsx://claim/m", "efs://claim/m"])
def test_other_sources_pass(uri: str) -> None:
    refuse_disallowed_source(_spec(uri), load_config({}))


def test_a_bad_value_of_the_setting_names_the_variable() -> None:
    with pytest.raises(ValueError, match="MODELSHIP_ALLOW_FILE_SOURCES"):
        load_config({"MODELSHIP_ALLOW_FILE_SOURCES": "perhaps"})
