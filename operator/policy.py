"""What the operator refuses to act on, whatever the API server accepted.

Pure checks on a parsed spec and the operator's configuration, run by the handlers before
anything reads a model (inspect_model) or renders a pod. The CLI does not call them: a person
running `modelship plan` on their own machine may read their own directories.
"""

from __future__ import annotations

from .api import ModelDeploymentSpec, SpecError
from .config import OperatorConfig
from .source import LocalSource


def refuse_disallowed_source(spec: ModelDeploymentSpec, config: OperatorConfig) -> None:
    """Raise SpecError naming spec.model.uri for a file:// source the operator may not use.

    A file:// source would make the operator read its own file system and render a hostPath of
    that directory into the runtime pod: on a shared cluster, any host directory. It is for
    local development and the demo, where the operator runs with MODELSHIP_ALLOW_FILE_SOURCES.
    """
    if isinstance(spec.model.source, LocalSource) and not config.allow_file_sources:
        raise SpecError(
            "spec.model.uri",
            f"{spec.model.uri!r}: file:// sources are turned off in this cluster (they would "
            "mount a directory of the node into the pod). Upload the model to S3 and use "
            "s3://bucket/prefix, or an fsx:// or efs:// volume; a cluster administrator can "
            "allow file:// for local development with the chart value operator.allowFileSources "
            "(MODELSHIP_ALLOW_FILE_SOURCES=true).",
        )
