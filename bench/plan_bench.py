"""Planning speed: make_plan over the whole built-in catalog for a 70B and a 405B model (and
an MXFP4 MoE and a Mamba hybrid, whose per-layer caches cost more to size).

    .venv/bin/python -m bench.plan_bench

Prints, per model, the median and p95 of wall time over repeated runs (after a warm-up), the
number of placements considered, and the chosen one.
"""

from __future__ import annotations

import statistics
import time

from modelship.operator.api import load_spec
from modelship.operator.catalog import load_catalog
from modelship.operator.modelinfo import model_info_from_config
from modelship.operator.sizing import make_plan

from tests.unit import configs

RUNS = 200
CASES = [
    (
        "Llama-3-70B bf16, 8k x 8",
        configs.LLAMA_3_70B,
        70_553_706_496,
        {"maxModelLen": 8192, "concurrency": 8},
    ),
    (
        "Llama-3.1-405B bf16, 8k x 4",
        configs.LLAMA_3_1_405B,
        405_853_388_800,
        {"maxModelLen": 8192, "concurrency": 4},
    ),
    (
        "Llama-3.1-405B bf16 on p5 only (multi-node)",
        configs.LLAMA_3_1_405B,
        405_853_388_800,
        {"maxModelLen": 8192},
    ),
    (
        "Llama-3.1-405B bf16 on trn1 only (TP128 over 4 nodes)",
        configs.LLAMA_3_1_405B,
        405_853_388_800,
        {"maxModelLen": 8192},
    ),
    ("gpt-oss-120b MXFP4, 8k x 8", configs.GPT_OSS_120B, 116_829_156_672, {"concurrency": 8}),
    (
        "Jamba-1.5-Mini (Mamba hybrid), 64k x 4",
        configs.JAMBA_1_5_MINI,
        51_570_000_000,
        {"maxModelLen": 65536, "concurrency": 4},
    ),
]
ONLY = {"p5 only": ["p5.48xlarge"], "trn1 only": ["trn1.32xlarge"]}


def main() -> None:
    catalog = load_catalog()
    print(f"catalog: {len(catalog.instance_types)} instance types; {RUNS} runs each\n")
    print("| model | median ms | p95 ms | placements considered | chosen |")
    print("|---|---|---|---|---|")
    for title, config, parameters, serving in CASES:
        info = model_info_from_config(config, weights=None, parameters=parameters, files=None)
        body = {"model": {"uri": "s3://models/m"}, "serving": serving}
        for key, instance_types in ONLY.items():
            if key in title:
                body["accelerator"] = {"instanceTypes": instance_types}
        spec = load_spec(body)
        make_plan(info, spec, catalog)  # warm-up
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            plan = make_plan(info, spec, catalog)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        considered = (
            1 + len(plan.alternatives) + len(plan.rejected) if plan.chosen else len(plan.rejected)
        )
        chosen = plan.chosen
        what = (
            f"{chosen.nodes} x {chosen.instance_type} TP{chosen.tensor_parallel_size} PP{chosen.pipeline_parallel_size}"
            if chosen
            else "none"
        )
        print(
            f"| {title} | {statistics.median(times):.2f} | {times[int(RUNS * 0.95)]:.2f} | {considered} | {what} |"
        )


if __name__ == "__main__":
    main()
