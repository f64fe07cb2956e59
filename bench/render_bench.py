"""How long render() takes per ModelDeployment, and schema validation per object.

    .venv/bin/python -m bench.render_bench

render() runs on every reconcile, so it should cost well under a millisecond; validation is
test-only (kubernetes_validate re-reads its JSON schema files on every call).
"""

from __future__ import annotations

import time

from modelship.operator.render import render, render_documents

from tests.unit.schemas import validate_object
from tests.unit.test_render import SCENARIOS


def main() -> None:
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        for ref, placement, config in SCENARIOS.values():
            render(ref, placement, config)
    per_render_us = (time.perf_counter() - started) / (rounds * len(SCENARIOS)) * 1e6
    print(
        f"render(): {per_render_us:.0f} us per ModelDeployment ({len(SCENARIOS)} scenarios x {rounds})"
    )

    documents = [doc for args in SCENARIOS.values() for doc in render_documents(*args)]
    started = time.perf_counter()
    validate_object(documents[0])  # first call loads the CRD files
    first_s = time.perf_counter() - started
    builtin = [
        d
        for d in documents
        if "/" not in d["apiVersion"]
        or d["apiVersion"].split("/")[0] in ("apps", "policy", "autoscaling")
    ]
    custom = [d for d in documents if d not in builtin]
    for name, group in (
        ("built-in (kubernetes_validate, 2 versions)", builtin),
        ("CRD (jsonschema)", custom),
    ):
        started = time.perf_counter()
        for doc in group:
            validate_object(doc)
        per_ms = (time.perf_counter() - started) / len(group) * 1e3
        print(f"validate_object {name}: {per_ms:.1f} ms per object over {len(group)} objects")
    print(
        f"first validate_object call (loads all CRD schemas, 1.3 MB LWS included): {first_s:.2f} s"
    )


if __name__ == "__main__":
    main()
