"""A shape as pydantic specs: fabric, pools, deployments, catalog entries, tenants and the site it runs on.

A shape is one portable YAML file (design.md: "shape"). Each part validates on its own here and the rules
between parts (names unique, a deployment's pool exists, an entry's deployment and parent exist) are checked
by `Shape` itself; what needs the arch and fabric catalogs (the arch exists, the slice fits the fabric, a plan
can be found) is `stack.validate`'s. Nothing here touches a database or starts a process.

The site is part of the file so that a hybrid pair (the same shape for a cloud region and an on-premises site)
is two files that differ in `site:` only; `matrixstack up --site` overrides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.spec import PolicyName, SliceRequest
from matrixstack.perf.spec import InstancePlan, Plan, Slo, Workload
from matrixstack.portal.resolve import vllm_adapter_refusal
from matrixstack.portal.spec import NAME_PATTERN, EntrySpec, KeyLimits
from matrixstack.specio import Strict, read_yaml, validate_spec

SHAPE_VERSION = 1
SiteKind = Literal["local", "ray", "k8s"]
EngineKind = Literal["matrixstack", "vllm"]
WEIGHTS_PACKAGED = "packaged"  # the weights shipped in the package (tiny-moe)
WEIGHTS_RANDOM = "random"  # seeded random weights: smoke tests only


def _name_type(what: str) -> Any:
    """Return the type of a `what` name: a str of 1-128 letters, digits, '.', '_', ':' or '-' (ValueError naming
    `what` otherwise)."""

    def check(name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"{what} name {name!r} is not allowed: use 1-128 letters, digits, '.', '_', ':' or '-'")
        return name

    return Annotated[str, AfterValidator(check)]


PoolName = _name_type("pool")
DeploymentName = _name_type("deployment")
TenantName = _name_type("tenant")
ShapeName = _name_type("shape")


class PoolShape(Strict):
    """A matrix pool over `fabrics` copies of the shape's fabric."""

    name: PoolName = Field("main", description="pool name")
    fabrics: int = Field(1, ge=1, description="integer copies of the shape's fabric in this pool")


class EngineArgs(Strict):
    """The builtin engine's settings (as `matrixstack engine serve` takes them)."""

    max_model_len: int = Field(2048, gt=0, description="integer tokens per sequence")
    num_kv_blocks: int = Field(1024, gt=0, description="integer KV cache blocks")
    block_size: int = Field(16, gt=0, description="integer tokens per KV cache block")
    max_num_seqs: int | None = Field(
        None,
        gt=0,
        description="integer sequences per step; default: 64 on the builtin engine, the plan's decode sequences per "
        "data-parallel rank on vLLM",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="float32, bfloat16 or float16")


class DeploymentShape(Strict):
    """A deployment: an arch with weights, an engine, a plan and the slice it asks for.

    `plan: auto` asks perf for one when the shape is applied (pins fix fields, as `matrixstack plan --pin`): the
    builtin engine runs prefill and decode in one instance, so its plan is one `InstancePlan` over the slice; a
    vllm deployment gets a disaggregated `Plan`, or takes a given `InstancePlan`: one vLLM server running both
    phases, as on a slice too small for a prefill and a decode instance (one CPU core). Engine workers
    (expert-parallel ranks) = the plan's EP degree (the decode instance's for a `Plan`).
    """

    name: DeploymentName = Field(description="deployment name; also the model id its engine serves")
    arch: str = Field(description="built-in arch name (e.g. tiny-moe) or arch YAML path")
    weights: str = Field(
        WEIGHTS_PACKAGED, description="'packaged' (the package's own), 'random' (smoke tests) or a folder path"
    )
    engine: EngineKind = Field("matrixstack", description="matrixstack (the builtin engine) or vllm")
    pool: str = Field("main", description="the pool its slice comes from")
    tenant: str = Field("platform", description="matrix tenant that holds the slice")
    slice: SliceRequest = Field(description="the slice it asks for (devices or dies, host CPUs, DRAM, constraints)")
    policy: PolicyName = Field("matrix", description="allocation policy: matrix, server or tiered")
    plan: Literal["auto"] | InstancePlan | Plan = Field("auto", description="'auto' (from perf) or a given plan")
    pins: dict[str, int | float] = Field(
        default_factory=dict, description="with plan auto: fixed plan fields, e.g. {'decode.ep': 2}"
    )
    workload: Workload = Field(default_factory=Workload, description="the requests the plan is made for")
    slo: Slo = Field(default_factory=Slo, description="latency targets of the plan")
    engine_args: EngineArgs = Field(default_factory=EngineArgs)

    @model_validator(mode="after")
    def _plan_kind(self) -> DeploymentShape:
        if self.pins and self.plan != "auto":
            raise ValueError("pins: pins fix fields of an auto plan; drop them or set plan: auto")
        for pin in self.pins:
            phase, _, field = pin.partition(".")
            if phase not in ("prefill", "decode") or not field:
                raise ValueError(f"pins: {pin!r} is not PHASE.FIELD with PHASE prefill or decode (e.g. decode.ep)")
        if self.engine == "matrixstack" and isinstance(self.plan, Plan):
            raise ValueError("plan: the builtin engine runs one colocated instance; give an instance plan or auto")
        return self


class ShapeBackend(Strict):
    """An L0 entry's backend in a shape: a deployment of this shape, an engine/vLLM server at a URL, or an upstream.

    The URL of a deployment is only known once a site runs it, so a shape names the deployment; an engine or vLLM
    server that the shape does not run (registered by hand) is given by its URL. The upstream's secret is never in
    the file: `api_key_env` names the environment variable that holds it.
    """

    kind: Literal["engine", "upstream", "vllm"] = Field(description="engine, upstream or vllm")
    deployment: str | None = Field(None, description="engine/vllm: a deployment of this shape (or give url)")
    url: str | None = Field(None, description="OpenAI base URL including /v1: upstream, or engine/vllm not run here")
    model: str | None = Field(None, description="model id sent to the backend (default: the deployment's name)")
    api_key_env: str | None = Field(None, description="upstream: environment variable holding its secret")
    adapters: bool = Field(
        False, description="the backend serves adapters by name (a builtin-engine backend always does)"
    )

    @model_validator(mode="after")
    def _target(self) -> ShapeBackend:
        if self.kind == "upstream":
            if self.url is None or self.deployment is not None:
                raise ValueError("an upstream backend needs url (its OpenAI base URL) and no deployment")
        elif (self.deployment is None) == (self.url is None):
            raise ValueError(
                f"a {self.kind} backend needs exactly one of deployment (a deployment of this shape) or url (a "
                "server this shape does not run)"
            )
        return self


class ShapeEntry(EntrySpec):
    """A catalog entry as in `matrixstack catalog add`, with a `ShapeBackend` instead of a URL backend."""

    backend: ShapeBackend | None = Field(None, description="required on L0, forbidden on L1/L2")  # type: ignore[assignment]


class KeyShape(KeyLimits):
    """An API key a tenant should have; created (and printed once) when the tenant has no valid key of this name."""

    name: str = Field("default", min_length=1, max_length=64, description="key name")
    admin: bool = Field(False, description="boolean, the key may use admin routes")


class TenantShape(Strict):
    """A tenant and the keys it should have."""

    name: TenantName = Field(description="tenant name")
    keys: list[KeyShape] = Field(default_factory=list, description="keys to create when missing")


class SiteShape(Strict):
    """Where the shape runs and how the portal is reached there."""

    kind: SiteKind = Field("local", description="local, ray or k8s")
    name: str = Field("local", description="a name for the site, e.g. a cloud region or a data center")
    portal_host: str = Field("127.0.0.1", description="address the portal listens on")
    portal_port: int = Field(8080, ge=0, le=65535, description="integer TCP port of the portal (0: any free one)")
    ray_address: str | None = Field(None, description="ray: the cluster address (default: $RAY_ADDRESS or auto)")
    namespace: str = Field("matrixstack", description="k8s: the namespace the manifests go to")
    image: str = Field("matrixstack:latest", description="k8s: the container image of engines and portal")
    models_claim: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="k8s: a PersistentVolumeClaim holding the model folders, mounted read-only at /models in engine "
        "pods (weights folders then lie under /models); default: each folder a hostPath of the nodes",
    )


class Shape(Strict):
    """A whole shape: what runs where (see the module docstring)."""

    version: Literal[1] = Field(SHAPE_VERSION, description="shape file format version: 1")
    name: ShapeName = Field(description="shape name")
    description: str = ""
    fabric: str | FabricSpec = Field(description="a built-in fabric name, 'local', a fabric YAML path, or inline")
    pools: list[PoolShape] = Field(default_factory=lambda: [PoolShape()], description="matrix pools")
    deployments: list[DeploymentShape] = Field(default_factory=list)
    catalog: list[ShapeEntry] = Field(default_factory=list, description="catalog entries, parents first or not")
    tenants: list[TenantShape] = Field(default_factory=list)
    site: SiteShape = Field(default_factory=SiteShape)

    @model_validator(mode="after")
    def _references(self) -> Shape:
        for what, names in (
            ("pool", [p.name for p in self.pools]),
            ("deployment", [d.name for d in self.deployments]),
            ("catalog entry", [e.name for e in self.catalog]),
            ("tenant", [t.name for t in self.tenants]),
        ):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{what} name(s) {', '.join(twice)} appear more than once; names must be unique")
        pools = {p.name for p in self.pools}
        for d in self.deployments:
            if d.pool not in pools:
                raise ValueError(f"deployment {d.name}: pool {d.pool!r} is not in pools ({', '.join(sorted(pools))})")
        deployments = {d.name: d for d in self.deployments}
        entries = {e.name: e for e in self.catalog}
        for e in self.catalog:
            if e.backend is not None and e.backend.deployment is not None:
                target = deployments.get(e.backend.deployment)
                if target is None:
                    missing = e.backend.deployment
                    raise ValueError(f"catalog entry {e.name}: deployment {missing!r} is not in deployments")
                wanted = "engine" if target.engine == "matrixstack" else "vllm"
                if e.backend.kind != wanted:
                    raise ValueError(
                        f"catalog entry {e.name}: deployment {target.name} runs engine {target.engine}; "
                        f"use backend kind {wanted}"
                    )
            if e.parent is not None:
                parent = entries.get(e.parent)
                if parent is None:
                    raise ValueError(f"catalog entry {e.name}: parent {e.parent!r} is not in the catalog")
                root = entries.get(parent.parent, parent) if parent.parent is not None else parent
                if e.adapter and root.backend is not None and root.backend.kind == "vllm":
                    raise ValueError(vllm_adapter_refusal(e.name, e.adapter, root.name))
                allowed = {"L1": ("L0",), "L2": ("L1", "L0")}[e.level]
                if parent.level not in allowed:
                    raise ValueError(
                        f"catalog entry {e.name}: an {e.level} entry's parent must be {' or '.join(allowed)}, "
                        f"{parent.name} is {parent.level}"
                    )
        return self

    def deployment(self, name: str) -> DeploymentShape:
        """Return the deployment called `name` (KeyError when there is none)."""
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)

    def dump(self) -> dict[str, Any]:
        """Return the shape as YAML-ready data without defaults that say nothing (round-trips through load).

        The version comes first, and pools, keys and the site's kind are written even when they are the defaults,
        so that a reader sees every name (a key is never `{}`).
        """
        data = self.model_dump(mode="json", exclude_defaults=True, exclude={"version"})
        data["pools"] = _named(self.pools, data.get("pools", [{} for _ in self.pools]))
        for tenant, dumped in zip(self.tenants, data.get("tenants", []), strict=True):
            if "keys" in dumped:
                dumped["keys"] = _named(tenant.keys, dumped["keys"])
        data["site"] = {"kind": self.site.kind} | data.get("site", {})
        data["version"] = SHAPE_VERSION
        return {name: data[name] for name in type(self).model_fields if name in data}


def _named(models: list[Any], dumped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return dumped models each with its `name` first, also when the name is the default."""
    return [{"name": model.name} | item for model, item in zip(models, dumped, strict=True)]


def parse_shape(data: dict[str, Any], source: str) -> Shape:
    """Return `data` validated as a Shape; SpecError lists each bad field with `source` in the message."""
    return validate_spec(Shape, data, source)


def load_shape(path: Path | str) -> Shape:
    """Return the shape in a YAML file; SpecError on a missing, malformed or invalid file."""
    return parse_shape(read_yaml(path, "shape"), f"shape file {path}")
