"""The `modelship` command line.

    modelship plan      size the hardware for a model (a ModelDeployment file, or flags)
    modelship render    print the Kubernetes objects the operator would apply
    modelship crd       print the ModelDeployment CustomResourceDefinition
    modelship catalog   list the accelerator catalog
    modelship models    list the well-known models whose published facts plan without files
    modelship operator  run the operator (kopf)
    modelship runtime   the runtime pod's entry point (fetch, verify, serve)
    modelship demo      the whole path on this machine: tiny model, local S3, plan, serve, ask

Exit status: 0 success, 1 bad input, 2 (plan, render) nothing fits.

Previews work offline: when the model's files cannot be read (no AWS credentials, no access, an
fsx:// or efs:// volume), plan and render say so in one line on stderr and plan from the
published facts of a well-known model (--known-model, spec.model.architecture.knownModel, or the
one the URI names) or from spec.model.architecture and spec.model.parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

from . import api
from .api import SpecError
from .catalog import Catalog, CatalogError, load_catalog
from .config import ConfigError, OperatorConfig, shared_neuron_cache
from .knownmodels import (
    KnownModel,
    KnownModelError,
    get_known_model,
    known_models,
    match_known_model,
)
from .modelinfo import (
    ModelInfoError,
    ModelUnreadableError,
    inspect_model,
    model_info_from_config,
    model_info_from_known_model,
)
from .nodepool import EFA_LABEL, placement_pool_name
from .plan import STATE_KINDS, ModelInfo, Placement, Plan
from .render import RenderError
from .source import SourceError, VolumeSource

EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_FIT = 0, 1, 2

# spec fields and the plan flags that set them, so errors speak the user's language
FLAG_FOR_FIELD = {
    "spec.model.uri": "--model",
    "spec.model.parameters": "--params",
    "spec.model.quantization": "--quantization",
    "spec.model.architecture.knownModel": "--known-model",
    "spec.serving.maxModelLen": "--max-model-len",
    "spec.serving.concurrency": "--concurrency",
    "spec.serving.kvCacheDtype": "--kv-cache-dtype",
    "spec.accelerator.family": "--accelerator-family",
    "spec.accelerator.instanceTypes": "--instance-types",
    "spec.accelerator.maxAccelerators": "--max-accelerators",
    "spec.accelerator.maxCostPerHour": "--max-cost-per-hour",
    "spec.accelerator.tensorParallelSize": "--tensor-parallel-size",
    "spec.accelerator.capacityType": "--capacity-type",
    "spec.accelerator.maxNodesPerReplica": "--max-nodes-per-replica",
}


# The operator's settings behind render's flags: errors from shared code name the variable, the
# CLI names the flag instead (render reads no MODELSHIP_* variables).
FLAG_FOR_ENV = {
    "MODELSHIP_CLUSTER_NAME": "--cluster-name",
    "MODELSHIP_NODE_ROLE": "--node-role",
    "MODELSHIP_NODE_POOL_MODE": "--node-pool-mode",
    "MODELSHIP_NODE_CLASS_NAME": "--node-class-name",
    "MODELSHIP_AUTOSCALER": "--autoscaler",
    "MODELSHIP_CATALOG_PATH": "--catalog",
}
# Marked stand-ins for what render cannot know without a cluster; replace them before applying.
PLACEHOLDER_CLUSTER_NAME = "REPLACE-ME-cluster-name"
PLACEHOLDER_NODE_ROLE = "REPLACE-ME-node-role"


class CliError(Exception):
    """Bad input: printed as `modelship: error: ...`, exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage exits 1 like every other bad input (2 means nothing fits)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _note(message: str) -> None:
    """One line on stderr, so that stdout stays the plan or the YAML."""
    print(f"modelship: {message}", file=sys.stderr)


def _error(message: str) -> int:
    print(f"modelship: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _model_uri(value: str) -> str:
    """Accept plain paths for local models: /models/llama and ./llama mean file:///..."""
    if "://" in value:
        return value
    return "file://" + str(Path(value).expanduser().resolve())


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def spec_from_args(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(name, spec dict) from -f FILE and/or flags; flags override the file."""
    name = "model"
    spec: dict[str, Any] = {}
    if args.file:
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            documents = [d for d in yaml.safe_load_all(text) if d]
        except OSError as error:
            raise CliError(f"-f {args.file}: cannot be read ({error.strerror}).") from None
        except yaml.YAMLError as error:
            raise CliError(f"-f {args.file}: not valid YAML ({error}).") from None
        models = [d for d in documents if isinstance(d, dict) and d.get("kind") == api.KIND]
        if not models and len(documents) == 1:
            api.load_manifest(documents[0])  # one document of another kind: name the field
        if len(models) != 1:
            raise CliError(f"-f {args.file}: expected one {api.KIND}, found {len(models)}.")
        document = models[0]
        api.load_manifest(document)  # validates kind, apiVersion, metadata.name and the spec
        name = document["metadata"]["name"]
        spec = document.get("spec") or {}
    flags = {
        "model.uri": _model_uri(args.model) if args.model else None,
        "model.parameters": args.params,
        "model.architecture.knownModel": args.known_model,
        "model.quantization": args.quantization,
        "serving.maxModelLen": args.max_model_len,
        "serving.concurrency": args.concurrency,
        "serving.kvCacheDtype": args.kv_cache_dtype,
        "accelerator.family": args.accelerator_family,
        "accelerator.instanceTypes": (
            [t.strip() for t in args.instance_types.split(",") if t.strip()]
            if args.instance_types
            else None
        ),
        "accelerator.maxAccelerators": args.max_accelerators,
        "accelerator.maxCostPerHour": args.max_cost_per_hour,
        "accelerator.tensorParallelSize": args.tensor_parallel_size,
        "accelerator.capacityType": args.capacity_type,
        "accelerator.maxNodesPerReplica": args.max_nodes_per_replica,
    }
    for path, value in flags.items():
        if value is not None:
            _set(spec, path, value)
    if "uri" not in spec.get("model", {}):
        raise CliError(
            "--model is required (or -f FILE): a directory or s3:// prefix holding the model's "
            "config.json. --params alone does not say how many layers and KV heads it has."
        )
    return name, spec


def inspect(spec: api.ModelDeploymentSpec, endpoint_url: str | None = None) -> ModelInfo:
    """ModelInfo for a spec: config.json and safetensors headers, with the spec's overrides.

    When the files cannot be read (no credentials or access, a volume the CLI does not mount),
    says so in one line on stderr and plans from facts the user can name instead."""
    model = spec.model
    try:
        if isinstance(model.source, VolumeSource):
            raise ModelUnreadableError(
                f"{model.uri}: the CLI does not mount {model.source.scheme} volumes.",
                f"the CLI does not mount {model.source.scheme} volumes",
            )
        return inspect_model(
            model.source,
            overrides=model.architecture,
            parameters=model.parameter_count,
            endpoint_url=endpoint_url,
        )
    except ModelUnreadableError as error:
        return _inspect_offline(spec, error)


def _inspect_offline(spec: api.ModelDeploymentSpec, error: ModelUnreadableError) -> ModelInfo:
    model, architecture = spec.model, spec.model.architecture
    named = architecture.known_model if architecture else None
    known: KnownModel | None = None
    if named:
        known, how = get_known_model(named), "named by --known-model / knownModel"
    else:
        known, how = match_known_model(model.uri), "matched from the URI"
    why = f"{model.uri} was not read ({error.reason})"
    if known is not None:
        _note(
            f"cannot read {model.uri} ({error.reason}); planning from the published config.json of {known.id} ({how})."
        )
        return model_info_from_known_model(
            known, overrides=architecture, parameters=model.parameter_count, why=why
        )
    try:
        info = model_info_from_config(
            {}, weights=None, overrides=architecture, parameters=model.parameter_count, files=None
        )
    except ModelInfoError:
        # The reason, not the whole message: that one is written for the operator's status.
        raise ModelInfoError(
            f"cannot read {model.uri} ({error.reason}). To plan without reading the files, "
            "name the model's architecture: "
            "--known-model ID (`modelship models` lists them; spec.model.architecture.knownModel "
            "in a file), or spec.model.architecture fields and spec.model.parameters."
        ) from None
    _note(
        f"cannot read {model.uri} ({error.reason}); planning from spec.model.architecture and spec.model.parameters."
    )
    return info.model_copy(
        update={
            "warnings": [
                *info.warnings,
                f"{why}; the plan rests on spec.model.architecture and spec.model.parameters alone.",
            ]
        }
    )


def build_plan(args: argparse.Namespace) -> tuple[str, api.ModelDeploymentSpec, Plan]:
    from .sizing import make_plan

    name, raw_spec = spec_from_args(args)
    spec = api.load_spec(raw_spec)
    catalog = load_catalog(args.catalog)
    info = inspect(spec, args.endpoint_url)
    compile_step = shared_neuron_cache(args.neuron_cache_uri)
    return name, spec, make_plan(info, spec, catalog, compile_step=compile_step)


def _gib(value: int | float) -> str:
    return f"{value / (1 << 30):.1f} GiB"


def _count(value: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return str(value)


def _cost(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.2f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += [
        "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _accelerators(placement: Placement) -> str:
    nodes = f"{placement.nodes} x " if placement.nodes > 1 else ""
    return f"{nodes}{placement.accelerators_per_node} x {placement.accelerator_type}"


def _hybrid_layers(model: ModelInfo) -> str:
    """', 4 attention + 28 mamba layers' for models whose layers are not all attention (Falcon-H1:
    ', 36 attention_mamba layers'; Nemotron-H: ', 4 attention + 24 mamba + 24 mlp layers')."""
    kinds = model.layer_kinds()
    if not any(kind in STATE_KINDS for kind in kinds):
        return ""
    attention = sum(kind in ("full_attention", "sliding_attention") for kind in kinds)
    counts = [f"{attention} attention"] if attention else []
    for kind in ("attention_mamba", "mamba", "linear_attention", "mlp"):
        if kind in kinds:
            counts.append(f"{kinds.count(kind)} {kind}")
    return f", {' + '.join(counts)} layers"


def format_plan(plan: Plan) -> str:
    """The human-readable plan: model, needs, chosen placement, alternatives, rejections."""
    model, needs = plan.model, plan.needs
    out = [
        f"Model     {model.architecture} ({model.model_type}), {_count(model.parameters)} "
        f"parameters ({model.parameters_source}), {model.dtype}"
        + (f", {model.quantization}" if model.quantization != "none" else ""),
        f"          {model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads / {model.num_key_value_heads} KV heads x "
        f"{model.head_dim}, context {model.max_position_embeddings:,}"
        + (f", MoE {model.num_experts} experts" if model.num_experts else "")
        + (f", MLA rank {model.kv_lora_rank}" if model.kv_lora_rank else "")
        + (f", sliding window {model.sliding_window}" if model.sliding_window else "")
        + _hybrid_layers(model),
        f"Needs     maxModelLen {needs.max_model_len:,} x concurrency {needs.concurrency}, "
        f"weights {needs.quantization}, KV cache {needs.kv_cache_dtype}",
    ]
    out += [f"Warning   {warning}" for warning in model.warnings]
    chosen = plan.chosen
    if chosen:
        memory = chosen.memory
        unit = "GPU" if chosen.accelerator_vendor == "nvidia" else "NeuronCore"
        out += [
            "",
            f"Chosen    {chosen.instance_type}: {_accelerators(chosen)}, TP {chosen.tensor_parallel_size}"
            + (f", PP {chosen.pipeline_parallel_size}" if chosen.pipeline_parallel_size > 1 else "")
            + f", {_cost(chosen.cost_per_hour_usd)}/h on-demand",
            f"          per {unit}: weights {_gib(memory.weight_bytes)}, activations "
            f"{_gib(memory.activation_bytes)}, runtime {_gib(memory.runtime_overhead_bytes + memory.cuda_graph_bytes)}, "
            f"KV cache {_gib(memory.kv_cache_bytes)} (of {_gib(memory.usable_bytes)} usable)",
            f"          KV cache holds {chosen.kv_cache_tokens:,} tokens: "
            f"{chosen.max_concurrent_sequences} sequences of {needs.max_model_len:,}",
            f"          pod: {chosen.resource_name}: {chosen.resource_count}"
            + (f", vpc.amazonaws.com/efa: {chosen.efa_interfaces}" if chosen.efa_interfaces else "")
            + f", cpu {chosen.cpu_request}, "
            f"memory {_gib(chosen.memory_request_bytes)}, disk {_gib(chosen.ephemeral_storage_bytes)}; "
            f"ready in about {chosen.estimated_ready_seconds // 60 + 1} min after the node",
            f"          vllm serve {' '.join(chosen.engine_args)}",
        ]
        if chosen.efa_interfaces:
            pool = placement_pool_name(chosen)
            out.append(
                f"          nodes: EFA pool {pool} ({EFA_LABEL}=true), {chosen.efa_interfaces} "
                "EFA interfaces a node: Karpenter attaches them; eks-nodegroup mode launches the "
                f"group from launch template {pool} in cluster placement group {pool}, one zone"
            )
        out += [f"Note      {note}" for note in chosen.notes]
    else:
        out += ["", "Chosen    nothing fits. What would:"]
        out += [f"          - {suggestion}" for suggestion in plan.suggestions]
    if plan.alternatives:
        rows = [
            [
                p.instance_type,
                _accelerators(p),
                str(p.tensor_parallel_size),
                str(p.pipeline_parallel_size),
                f"{p.kv_cache_tokens:,}",
                str(p.max_concurrent_sequences),
                _cost(p.cost_per_hour_usd),
            ]
            for p in plan.alternatives
        ]
        out += ["", "Alternatives (cheapest first)"]
        out.append(
            _table(rows, ["INSTANCE", "ACCELERATORS", "TP", "PP", "KV TOKENS", "SEQS", "$/H"])
        )
    if plan.rejected:
        rows = [[r.instance_type, str(r.accelerator_count), r.reason] for r in plan.rejected]
        out += ["", "Rejected"]
        out.append(_table(rows, ["INSTANCE", "ACCEL", "REASON"]))
    return "\n".join(out)


def _print_structured(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False, width=120), end="")


def cmd_plan(args: argparse.Namespace) -> int:
    _, _, plan = build_plan(args)
    if args.output == "table":
        print(format_plan(plan))
    else:
        _print_structured(plan.to_json_dict(), args.output)
    return EXIT_OK if plan.chosen else EXIT_NO_FIT


def cmd_render(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .render import ModelDeploymentRef, render

    name, spec, plan = build_plan(args)
    if plan.chosen is None:
        print(format_plan(plan), file=sys.stderr)
        return EXIT_NO_FIT
    config = render_config(args)
    md = ModelDeploymentRef(
        name=name, namespace=args.namespace, uid=args.uid or "", generation=1, spec=spec
    )
    rendered = render(md, plan.chosen, config)
    documents = [*rendered.node_pool_objects, *rendered.children]
    if plan.chosen.compile_instance_type is not None:
        from .compilejob import render_compile_job, render_compile_pool

        # Step 1 first: the operator applies the serving objects once the Job has succeeded.
        compile_step = [
            *render_compile_pool(md, plan.chosen, config),
            render_compile_job(md, plan.chosen, config),
        ]
        documents = [*compile_step, *documents]
    if rendered.node_group is not None:
        # Not a Kubernetes object: the operator creates it through the EKS API (boto3).
        text = yaml.safe_dump({"eksManagedNodeGroup": asdict(rendered.node_group)}, sort_keys=False)
        print("".join(f"# {line}\n" for line in text.splitlines()), end="")
    if not args.uid:
        # Without the live object's uid there is no owner to point at; the operator sets it.
        for document in documents:
            document.get("metadata", {}).pop("ownerReferences", None)
    print(yaml.safe_dump_all(documents, sort_keys=False, width=120), end="")
    return EXIT_OK


def kubeconfig_cluster_name(env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(EKS cluster name, context name) of the current kubeconfig context, when it is an EKS
    cluster named the way `aws eks update-kubeconfig` (an ARN) or eksctl (NAME.REGION.eksctl.io)
    write it; None otherwise (no kubeconfig, another kind of cluster)."""
    env = dict(os.environ) if env is None else env
    paths = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p] or [
        str(Path.home() / ".kube" / "config")
    ]
    for path in paths:
        try:
            kubeconfig = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(kubeconfig, dict) or not kubeconfig.get("current-context"):
            continue
        current = kubeconfig["current-context"]
        for entry in kubeconfig.get("contexts") or []:
            if isinstance(entry, dict) and entry.get("name") == current:
                cluster = str((entry.get("context") or {}).get("cluster") or "")
                match = re.match(
                    r"^arn:aws[\w-]*:eks:[\w-]+:\d+:cluster/(.+)$", cluster
                ) or re.match(r"^([^.]+)\.[a-z0-9-]+\.eksctl\.io$", cluster)
                return (match.group(1), current) if match else None
        return None
    return None


def render_config(args: argparse.Namespace) -> OperatorConfig:
    """The operator settings render uses: its flags, the current kubeconfig context's EKS cluster
    name, and marked placeholders for what neither says (one line on stderr names them)."""
    mode = args.node_pool_mode or "karpenter"
    cluster_name, node_role = args.cluster_name, args.node_role
    needs_names = mode == "eks-nodegroup" or (mode == "karpenter" and not args.node_class_name)
    if needs_names and not cluster_name:
        found = kubeconfig_cluster_name()
        if found:
            cluster_name = found[0]
            _note(f"--cluster-name {found[0]} (from the current kubeconfig context {found[1]!r}).")
        else:
            cluster_name = PLACEHOLDER_CLUSTER_NAME
    if needs_names and not node_role:
        node_role = PLACEHOLDER_NODE_ROLE
    placeholders = [
        f"{value} (--{flag})"
        for value, flag in (
            (cluster_name, "cluster-name"),
            (node_role, "node-role"),
        )
        if value in (PLACEHOLDER_CLUSTER_NAME, PLACEHOLDER_NODE_ROLE)
    ]
    if placeholders:
        _note(f"placeholders {', '.join(placeholders)} mark what to set before applying.")
    return OperatorConfig(
        node_pool_mode=mode,
        autoscaler=args.autoscaler or "keda",
        cluster_name=cluster_name or "",
        node_role=node_role or "",
        node_class_name=args.node_class_name or "",
        catalog_path=args.catalog,
        neuron_cache_uri=args.neuron_cache_uri,
    )


def cmd_models(args: argparse.Namespace) -> int:
    models = known_models().models
    if args.output != "table":
        _print_structured(
            [model.model_dump(by_alias=True, exclude_none=True) for model in models], args.output
        )
        return EXIT_OK
    rows = []
    for model in models:
        config = {**model.config, **(model.config.get("text_config") or {})}
        experts = (
            config.get("num_local_experts")
            or config.get("n_routed_experts")
            or config.get("num_experts")
        )
        quantization = (config.get("quantization_config") or {}).get("quant_method")
        rows.append(
            [
                model.id,
                _count(model.parameters),
                str(model.config["architectures"][0]),
                str(config["num_hidden_layers"]),
                f"{config['max_position_embeddings']:,}",
                f"{experts} experts" if experts else "dense",
                str(quantization or config.get("torch_dtype")),
            ]
        )
    print(_table(rows, ["MODEL", "PARAMS", "ARCHITECTURE", "LAYERS", "CONTEXT", "MOE", "WEIGHTS"]))
    print(
        "\nUse one: modelship plan --model URI --known-model MODEL, or "
        "spec.model.architecture.knownModel. Sources: modelship models -o yaml."
    )
    return EXIT_OK


def cmd_crd(args: argparse.Namespace) -> int:
    from .crd import crd_yaml

    print(crd_yaml(), end="")
    return EXIT_OK


def cmd_catalog(args: argparse.Namespace) -> int:
    catalog: Catalog = load_catalog(args.catalog)
    rows = []
    for instance in catalog.instance_types:
        accelerator = catalog.accelerator(instance)
        rows.append(
            [
                instance.name,
                f"{instance.count} x {accelerator.model}",
                f"{accelerator.memory_gib:g} GiB",
                str(instance.vcpus),
                f"{instance.memory_gib:g} GiB",
                "yes" if instance.efa else "no",
                _cost(instance.usd_per_hour),
            ]
        )
    print(f"Prices: {catalog.region} on-demand, {catalog.price_date} (approximate)")
    print(_table(rows, ["INSTANCE", "ACCELERATORS", "MEMORY EACH", "VCPU", "HOST", "EFA", "$/H"]))
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    from .handlers import run_operator

    return run_operator(args.rest)


def cmd_activator(args: argparse.Namespace) -> int:
    from .activator import main as activator_main

    return activator_main(args.rest)


def cmd_runtime(args: argparse.Namespace) -> int:
    from ..runtime.main import main as runtime_main

    return runtime_main(args.rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..runtime.demo import main as demo_main

    return demo_main(args.rest)


def _plan_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", help="a ModelDeployment YAML file ('-' for stdin)")
    parser.add_argument(
        "--model", help="model URI: s3://bucket/prefix, file:///dir or a local path"
    )
    parser.add_argument(
        "--params",
        help="parameter count when the package has no safetensors: 8B, 70.6B, 7000000000",
    )
    parser.add_argument(
        "--known-model",
        metavar="ID",
        help="plan from this well-known model's published facts when the files cannot be read "
        "(`modelship models` lists them), e.g. meta-llama/Llama-3.1-8B-Instruct",
    )
    parser.add_argument("--quantization", help=f"one of {', '.join(api.QUANTIZATIONS)}")
    # Numbers stay strings here: the spec validates them, so a bad one gets the same clean error.
    parser.add_argument("--max-model-len", help="longest sequence served, in tokens")
    parser.add_argument("--concurrency", help="sequences served at once at full context")
    parser.add_argument("--kv-cache-dtype", help="auto, fp8, fp8_e4m3 or fp8_e5m2")
    parser.add_argument("--accelerator-family", help="auto, nvidia, inferentia or trainium")
    parser.add_argument(
        "--instance-types",
        help="allowed instance types, comma-separated (patterns like g6e.* work)",
    )
    parser.add_argument("--max-accelerators", help="most accelerators per replica")
    parser.add_argument("--max-cost-per-hour", help="most USD per hour per replica")
    parser.add_argument("--tensor-parallel-size", help="pin the tensor-parallel degree")
    parser.add_argument("--capacity-type", help="on-demand or spot")
    parser.add_argument(
        "--max-nodes-per-replica",
        type=int,
        help="most nodes one replica may span (default 4; 1 keeps replicas on one node)",
    )
    parser.add_argument("--catalog", help="catalog override file (merged over the built-in one)")
    parser.add_argument(
        "--endpoint-url", help="S3 endpoint for S3-compatible stores (default: AWS_ENDPOINT_URL)"
    )
    parser.add_argument(
        "--neuron-cache-uri",
        default=os.environ.get("MODELSHIP_NEURON_CACHE_URI") or None,
        help="the operator's Neuron compile cache (Helm runtime.neuronCacheUri; default "
        "$MODELSHIP_NEURON_CACHE_URI): with an s3:// prefix a Neuron model may compile on a "
        "larger instance than it serves on",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="modelship",
        description="Size, provision and serve language models on Amazon EKS with vLLM.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    plan = commands.add_parser("plan", help="size the hardware for a model")
    _plan_flags(plan)
    plan.add_argument(
        "-o",
        "--output",
        choices=["table", "json", "yaml"],
        default="table",
        help="table for people (default), json or yaml for machines",
    )
    plan.set_defaults(handler=cmd_plan)

    render = commands.add_parser(
        "render", help="print the Kubernetes objects for a ModelDeployment"
    )
    _plan_flags(render)
    render.add_argument(
        "-n", "--namespace", default="default", help="namespace of the ModelDeployment (default)"
    )
    render.add_argument("--uid", help="the live ModelDeployment's uid, to set ownerReferences")
    render.add_argument(
        "--node-pool-mode",
        choices=["karpenter", "eks-nodegroup", "none"],
        help="how nodes are provisioned: karpenter (default), eks-nodegroup or none",
    )
    render.add_argument(
        "--cluster-name",
        help="EKS cluster name (default: the current kubeconfig context's EKS cluster, else the "
        f"placeholder {PLACEHOLDER_CLUSTER_NAME})",
    )
    render.add_argument(
        "--node-role",
        help=f"IAM role of the nodes (default: the placeholder {PLACEHOLDER_NODE_ROLE})",
    )
    render.add_argument(
        "--node-class-name",
        help="use this existing Karpenter EC2NodeClass instead of rendering one",
    )
    render.add_argument(
        "--autoscaler",
        choices=["keda", "hpa", "none"],
        help="what scales the replicas: keda (default), hpa or none",
    )
    render.set_defaults(handler=cmd_render)

    crd = commands.add_parser("crd", help="print the ModelDeployment CRD")
    crd.set_defaults(handler=cmd_crd)

    catalog = commands.add_parser("catalog", help="list the accelerator catalog")
    catalog.add_argument("--catalog", help="catalog override file (merged over the built-in one)")
    catalog.set_defaults(handler=cmd_catalog)

    models = commands.add_parser(
        "models", help="list the well-known models whose published facts plan without files"
    )
    models.add_argument(
        "-o",
        "--output",
        choices=["table", "json", "yaml"],
        default="table",
        help="table (default), or json / yaml with every entry's source and facts",
    )
    models.set_defaults(handler=cmd_models)

    for name, handler, text in [
        ("operator", cmd_operator, "run the operator"),
        ("activator", cmd_activator, "run the scale-from-zero activator (its own Deployment)"),
        ("runtime", cmd_runtime, "the runtime pod's entry point"),
        ("demo", cmd_demo, "run the whole path on this machine"),
    ]:
        sub = commands.add_parser(name, help=text, add_help=False)
        sub.add_argument(
            "rest", nargs=argparse.REMAINDER, help=f"arguments of `modelship {name}` (see --help)"
        )
        sub.set_defaults(handler=handler)
    return parser


PASSTHROUGH = {
    "operator": cmd_operator,
    "activator": cmd_activator,
    "runtime": cmd_runtime,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        # These commands parse their own flags (argparse's REMAINDER drops a leading --flag).
        return PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(_attach_dash_values(argv, parser))
    try:
        return int(args.handler(args))
    except SpecError as error:
        flag = FLAG_FOR_FIELD.get(error.field)
        where = (
            f"{error.field} ({flag})" if flag and not getattr(args, "file", None) else error.field
        )
        return _error(f"{where}: {error.message}")
    except (
        CliError,
        CatalogError,
        SourceError,
        ModelInfoError,
        ConfigError,
        RenderError,
        KnownModelError,
    ) as error:
        return _error(_flags_for_env(str(error)))
    except BrokenPipeError:
        # `modelship catalog | head`: the reader left; nothing more to say.
        sys.stderr.close()
        return EXIT_OK


def _flags_for_env(message: str) -> str:
    """Errors from code shared with the operator name its variables; the CLI names its flags."""
    for variable, flag in FLAG_FOR_ENV.items():
        message = message.replace(variable, flag)
    return message


def _value_options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(options that take a value, every option string), over the parser and its subcommands."""
    takes_value: set[str] = set()
    options: set[str] = set()
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            options.update(action.option_strings)
            if action.option_strings and action.nargs is None and action.const is None:
                takes_value.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return takes_value, options


def _attach_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--params -5B` -> `--params=-5B`: argparse takes a value starting with '-' for an option
    and fails with a usage error; attached, the value reaches validation like any other."""
    takes_value, options = _value_options(parser)
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if (
            token in takes_value
            and following is not None
            and following.startswith("-")
            and following.split("=", 1)[0] not in options
        ):
            out.append(f"{token}={following}")
            index += 2
            continue
        out.append(token)
        index += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
