"""The accelerator catalog: a data file of instance types, loaded and validated at start-up.

The built-in file is `data/catalog.yaml` (its header lists the sources). A user's file of the same
shape (MODELSHIP_CATALOG_PATH, or `modelship plan --catalog`) is merged over it: accelerators and
instance types with the same name are replaced, new ones are added.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .plan import AcceleratorVendor

GIB = 1 << 30
# Beside this module in the checkout, the editable install and the wheel. Not importlib.resources:
# modelship.operator is a namespace package, and Python 3.11 cannot read resources of one whose
# path holds setuptools' editable placeholder entry.
BUILTIN_CATALOG = Path(__file__).resolve().parent / "data" / "catalog.yaml"

RESOURCE_NAMES: dict[AcceleratorVendor, str] = {
    "nvidia": "nvidia.com/gpu",
    "inferentia": "aws.amazon.com/neuron",
    "trainium": "aws.amazon.com/neuron",
}
NEURON_CORE_RESOURCE = "aws.amazon.com/neuroncore"
AMI_TYPES: dict[AcceleratorVendor, str] = {
    "nvidia": "AL2023_x86_64_NVIDIA",
    "inferentia": "AL2023_x86_64_NEURON",
    "trainium": "AL2023_x86_64_NEURON",
}


class CatalogError(ValueError):
    pass


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Accelerator(_Entry):
    vendor: AcceleratorVendor
    model: str
    memory_gib: float = Field(alias="memoryGiB", gt=0)
    compute_capability: str | None = Field(None, alias="computeCapability")
    neuron_cores: int | None = Field(None, alias="neuronCores", ge=1)
    # Memory per accelerator (GiB) that vLLM was measured to use beyond what sizing models: the
    # ModelDeployment condition KVCacheAsPredicted computes it from the KV cache vLLM really
    # allocated. A catalog override records it so later plans use it (docs/sizing.md).
    extra_overhead_gib: float = Field(0.0, alias="extraOverheadGiB", ge=0)
    bf16: bool
    fp8: bool
    note: str = ""

    @model_validator(mode="after")
    def _vendor_fields(self) -> Accelerator:
        if self.vendor == "nvidia" and self.compute_capability is None:
            raise ValueError("NVIDIA accelerators need computeCapability (e.g. '8.9')")
        if self.vendor != "nvidia" and self.neuron_cores is None:
            raise ValueError("Neuron accelerators need neuronCores (cores per chip)")
        return self

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def sm_version(self) -> float:
        """Compute capability as a number (7.5, 8.0, 8.9 ...); 0 for Neuron."""
        return float(self.compute_capability) if self.compute_capability else 0.0


class InstanceType(_Entry):
    name: str
    accelerator_name: str = Field(alias="accelerator")
    count: int = Field(ge=1, description="Accelerators (GPUs or Neuron chips) per instance.")
    vcpus: int = Field(ge=1)
    memory_gib: float = Field(alias="memoryGiB", gt=0)
    network_gbps: str = Field(alias="networkGbps")
    efa: bool
    efa_interfaces_listed: int | None = Field(None, alias="efaInterfaces", ge=1)
    usd_per_hour: float | None = Field(alias="usdPerHour", gt=0)
    price_source: str = Field(alias="priceSource")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def efa_interfaces(self) -> int:
        """EFA devices a pod that has the node to itself requests (1 when not listed)."""
        if not self.efa:
            return 0
        return self.efa_interfaces_listed or 1


class NeuronSupport(_Entry):
    """What vLLM on Neuron (NxD Inference) serves, with where that list comes from."""

    source: str
    architectures: list[str] = Field(min_length=1)


class Catalog(_Entry):
    region: str
    price_date: str = Field(alias="priceDate")
    price_sources: dict[str, str] = Field(alias="priceSources")
    accelerators: dict[str, Accelerator]
    instance_types: list[InstanceType] = Field(alias="instanceTypes")
    neuron_support: NeuronSupport = Field(alias="neuronSupport")

    @model_validator(mode="after")
    def _references(self) -> Catalog:
        seen: set[str] = set()
        for instance in self.instance_types:
            if instance.name in seen:
                raise ValueError(f"instance type {instance.name} is listed twice")
            seen.add(instance.name)
            if instance.accelerator_name not in self.accelerators:
                raise ValueError(
                    f"instance type {instance.name}: accelerator {instance.accelerator_name!r} "
                    f"is not defined under accelerators ({', '.join(sorted(self.accelerators))})"
                )
            if instance.price_source not in self.price_sources:
                raise ValueError(
                    f"instance type {instance.name}: priceSource {instance.price_source!r} is not "
                    "defined under priceSources"
                )
        return self

    @cached_property
    def _by_name(self) -> dict[str, InstanceType]:
        return {instance.name: instance for instance in self.instance_types}

    def get(self, name: str) -> InstanceType | None:
        return self._by_name.get(name)

    def accelerator(self, instance: InstanceType) -> Accelerator:
        return self.accelerators[instance.accelerator_name]

    def vendor(self, instance: InstanceType) -> AcceleratorVendor:
        return self.accelerators[instance.accelerator_name].vendor


Kind = Literal["builtin", "override"]


def _read(path: Path | None) -> dict[str, Any]:
    if path is None:
        text = BUILTIN_CATALOG.read_text()
        where = "built-in catalog"
    else:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise CatalogError(f"catalog {path}: cannot be read ({error.strerror}).") from None
        where = f"catalog {path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CatalogError(f"{where}: not valid YAML ({error}).") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{where}: expected a mapping with accelerators and instanceTypes.")
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key in ("region", "priceDate", "neuronSupport"):
        if key in override:
            merged[key] = override[key]
    merged["priceSources"] = {**base.get("priceSources", {}), **override.get("priceSources", {})}
    # An accelerator in the override changes only the fields it gives (e.g. extraOverheadGiB
    # measured in the cluster); a new name adds an accelerator.
    base_accelerators = base.get("accelerators", {})
    merged["accelerators"] = {
        **base_accelerators,
        **{
            name: {**base_accelerators.get(name, {}), **(fields or {})}
            for name, fields in override.get("accelerators", {}).items()
        },
    }
    replaced = {entry.get("name"): entry for entry in override.get("instanceTypes", [])}
    merged["instanceTypes"] = [
        replaced.pop(entry["name"], entry) for entry in base.get("instanceTypes", [])
    ] + list(replaced.values())
    return merged


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The built-in catalog, merged with the override file at `path` when given."""
    data = _read(None)
    if path is not None:
        data = _merge(data, _read(Path(path)))
    try:
        return Catalog.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        source = f"catalog {path}" if path else "built-in catalog"
        raise CatalogError(f"{source}: {location}: {first['msg']}") from None
