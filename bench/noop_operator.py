"""A no-op kopf operator: the floor that bench/reconcile_bench.py compares modelship's with.

It handles create and resume of ModelDeployments labelled `bench.modelship.dev/operator: noop`
and writes one status field (`status.benchNoop`), with kopf's defaults otherwise (standalone: no
peering). The benchmark runs it as its own process with a ServiceAccount token, as it runs
`modelship operator`:

    kopf run --standalone --all-namespaces bench/noop_operator.py
"""

from __future__ import annotations

from typing import Any

import kopf

LABEL = "bench.modelship.dev/operator"


@kopf.on.resume("modelship.dev", "v1alpha1", "modeldeployments", labels={LABEL: "noop"})
@kopf.on.create("modelship.dev", "v1alpha1", "modeldeployments", labels={LABEL: "noop"})
def reconcile(patch: kopf.Patch, **_: Any) -> None:
    """Mark the object reconciled; nothing else."""
    patch.status["benchNoop"] = "reconciled"
