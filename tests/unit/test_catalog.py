"""The accelerator catalog: a data file, validated at load, overridable without code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from modelship.operator.catalog import CatalogError, load_catalog

REQUIRED = [
    *[f"g4dn.{s}" for s in ("xlarge", "2xlarge", "12xlarge", "metal")],
    *[f"g5.{s}" for s in ("xlarge", "12xlarge", "48xlarge")],
    *[f"g6.{s}" for s in ("xlarge", "12xlarge", "48xlarge")],
    *[f"g6e.{s}" for s in ("xlarge", "12xlarge", "48xlarge")],
    "p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge",
    "inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge",
    "trn1.2xlarge", "trn1.32xlarge", "trn1n.32xlarge", "trn2.48xlarge",
]  # fmt: skip


def test_builtin_catalog_covers_the_eks_inference_types() -> None:
    catalog = load_catalog()
    for name in REQUIRED:
        assert catalog.get(name) is not None, name


@pytest.mark.parametrize(
    ("name", "vendor", "count", "memory_gib", "cores"),
    [
        # AWS EC2 accelerated instance specifications; Neuron architecture docs for the cores.
        ("g5.48xlarge", "nvidia", 8, 22.3, None),
        ("p4de.24xlarge", "nvidia", 8, 79.2, None),
        ("p5en.48xlarge", "nvidia", 8, 139.8, None),
        ("inf2.48xlarge", "inferentia", 12, 32, 2),
        ("trn1.32xlarge", "trainium", 16, 32, 2),
        ("trn2.48xlarge", "trainium", 16, 96, 4),
    ],
)
def test_instance_facts(
    name: str, vendor: str, count: int, memory_gib: float, cores: int | None
) -> None:
    catalog = load_catalog()
    instance = catalog.get(name)
    assert instance is not None
    accelerator = catalog.accelerator(instance)
    assert (
        accelerator.vendor,
        instance.count,
        accelerator.memory_gib,
        accelerator.neuron_cores,
    ) == (vendor, count, memory_gib, cores)


def test_t4_has_no_bf16_and_ampere_no_native_fp8() -> None:
    catalog = load_catalog()
    assert catalog.accelerators["nvidia-t4"].bf16 is False
    assert catalog.accelerators["nvidia-a10g"].fp8 is False
    assert catalog.accelerators["nvidia-h100"].fp8 is True


def test_prices_are_dated_and_sourced() -> None:
    catalog = load_catalog()
    assert catalog.region == "us-east-1" and catalog.price_date
    for instance in catalog.instance_types:
        assert instance.price_source in catalog.price_sources
    assert catalog.get("p5e.48xlarge").usd_per_hour is None  # Capacity Blocks only  # type: ignore[union-attr]


def test_override_replaces_and_extends(tmp_path: Path) -> None:
    override = tmp_path / "catalog.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "accelerators": {
                    "nvidia-l4-gr": {
                        "vendor": "nvidia",
                        "model": "NVIDIA L4",
                        "memoryGiB": 22.0,
                        "computeCapability": "8.9",
                        "bf16": True,
                        "fp8": True,
                    }
                },
                "instanceTypes": [
                    {
                        "name": "gr7.mega",
                        "accelerator": "nvidia-l4-gr",
                        "count": 2,
                        "vcpus": 16,
                        "memoryGiB": 128,
                        "networkGbps": "25",
                        "efa": False,
                        "usdPerHour": 2.0,
                        "priceSource": "none",
                    },
                    {
                        "name": "g5.xlarge",
                        "accelerator": "nvidia-a10g",
                        "count": 1,
                        "vcpus": 4,
                        "memoryGiB": 16,
                        "networkGbps": "10",
                        "efa": False,
                        "usdPerHour": 0.5,
                        "priceSource": "none",
                    },
                ],
            }
        )
    )
    base = load_catalog()
    merged = load_catalog(override)
    assert len(merged.instance_types) == len(base.instance_types) + 1
    assert merged.get("g5.xlarge").usd_per_hour == 0.5  # type: ignore[union-attr]
    assert merged.get("gr7.mega") is not None


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        (
            "instanceTypes: [{name: x, accelerator: nope, count: 1, vcpus: 1, memoryGiB: 1, networkGbps: '1', efa: false, usdPerHour: 1, priceSource: none}]",
            "accelerator 'nope' is not defined",
        ),
        (
            "accelerators: {bad: {vendor: nvidia, model: X, memoryGiB: 10, bf16: true, fp8: false}}",
            "computeCapability",
        ),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_overrides_say_what_is_wrong(tmp_path: Path, text: str, hint: str) -> None:
    override = tmp_path / "catalog.yaml"
    override.write_text(text)
    with pytest.raises(CatalogError) as error:
        load_catalog(override)
    assert hint in str(error.value)
    assert str(override) in str(error.value)
