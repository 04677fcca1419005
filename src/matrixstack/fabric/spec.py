"""Pydantic models of a fabric: devices, hosts, planes and their switch tiers. Data only.

Conventions (see design.md): bandwidths are unidirectional GB/s (1e9 bytes/s); a plane's bandwidth is per
device (or per node for node-attached planes such as a VPC NIC); latencies are one-way microseconds; HBM and
DRAM capacities are GiB. A "rank" is what software addresses: a die where a device exposes its dies (Ascend
910C: two per NPU), the device otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from matrixstack.dtypes import Dtype
from matrixstack.specio import Strict

PlaneKind = Literal["scale_up", "scale_out", "frontend"]


class EfficiencySpec(Strict):
    """Achievable fractions of a device's peaks, measured or published; the perf layer's roofline uses them."""

    gemm: float = Field(gt=0, le=1, description="number in (0, 1], fraction of peak TFLOPS a large GEMM reaches")
    attention: float = Field(
        gt=0, le=1, description="number in (0, 1], fraction of peak TFLOPS compute-bound attention reaches"
    )
    hbm: float = Field(gt=0, le=1, description="number in (0, 1], fraction of HBM GB/s a streaming kernel reaches")
    matmul_kernel_us: float = Field(
        ge=0, description="number, fixed microseconds every matrix (GEMM or attention) kernel costs beyond its roofline"
    )
    vector_kernel_us: float = Field(
        ge=0, description="number, fixed microseconds every elementwise (vector) kernel costs beyond its roofline"
    )
    grouped_gemm_per_expert: bool = Field(
        False,
        description="true when the runtime's grouped expert GEMM runs one GEMM per active expert (torch's CPU "
        "grouped_mm), so each active expert adds two matrix kernels; false: one launch for all experts",
    )


class DeviceSpec(Strict):
    """An accelerator (or a CPU core for the `local` fabric): compute, memory, dies."""

    kind: str = Field(description="device model name, e.g. 'Ascend 910C'")
    vendor: str = Field(description="vendor name")
    devices_per_node: int = Field(gt=0, description="integer count of devices in one node")
    dies_per_device: int = Field(1, gt=0, description="integer count of dies software addresses as ranks")
    peak_tflops: dict[Dtype, float] = Field(
        description="mapping dtype -> dense peak TFLOPS (TOPS for int8) per device, e.g. {bf16: 989}"
    )
    hbm_gib: float = Field(gt=0, description="number, device memory per device in GiB")
    hbm_gbs: float = Field(gt=0, description="number, device memory bandwidth per device in GB/s")
    efficiency: EfficiencySpec
    die_link_gbs: float | None = Field(
        None, gt=0, description="number, unidirectional GB/s between the dies of one device"
    )
    die_link_latency_us: float | None = Field(
        None, ge=0, description="number, one-way latency in microseconds between the dies of one device"
    )

    @model_validator(mode="after")
    def _die_link_when_dies(self) -> DeviceSpec:
        if self.dies_per_device > 1 and (self.die_link_gbs is None or self.die_link_latency_us is None):
            raise ValueError("a device with dies_per_device > 1 needs die_link_gbs and die_link_latency_us")
        if not self.peak_tflops:
            raise ValueError("peak_tflops needs at least one dtype, e.g. {bf16: 989}")
        return self


class HostSpec(Strict):
    """The host CPUs and DRAM of one node."""

    cpu_kind: str = Field(description="CPU model name")
    cpus_per_node: int = Field(gt=0, description="integer count of CPU sockets per node")
    cores_per_cpu: int = Field(gt=0, description="integer count of cores per CPU socket")
    dram_gib: float = Field(gt=0, description="number, host DRAM per node in GiB")


class TierSpec(Strict):
    """One switch tier of a plane. Tier k's switch domain spans `nodes_per_domain` nodes."""

    name: str = Field(description="tier name, e.g. 'L1'")
    nodes_per_domain: int = Field(gt=0, description="integer count of nodes under one switch domain of this tier")
    switches_per_domain: int = Field(gt=0, description="integer count of switch chips in one domain of this tier")
    latency_us: float = Field(ge=0, description="number, one-way microseconds a path adds when it climbs to this tier")
    oversubscription: float = Field(
        1.0, ge=1.0, description="number >= 1, downlink:uplink ratio; traffic crossing this tier shares it"
    )


class PlaneSpec(Strict):
    """A network plane: the links and switch tiers one kind of traffic rides on."""

    name: str = Field(description="plane name, e.g. 'ub'")
    kind: PlaneKind = Field(description="one of scale_up, scale_out, frontend")
    protocol: str = Field(description="link protocol, e.g. 'UB', 'NVLink4', 'InfiniBand NDR', 'RoCEv2'")
    attached: Literal["device", "node"] = Field(
        "device", description="'device' when bandwidth_gbs is per device, 'node' when per node"
    )
    bandwidth_gbs: float = Field(gt=0, description="number, unidirectional GB/s per device (or per node)")
    efficiency: float = Field(
        gt=0, le=1, description="number in (0, 1], achievable fraction of bandwidth_gbs for bulk transfers"
    )
    tiers: list[TierSpec] = Field(min_length=1, description="list of switch tiers, lowest first")

    @model_validator(mode="after")
    def _tiers_grow(self) -> PlaneSpec:
        spans = [t.nodes_per_domain for t in self.tiers]
        if spans != sorted(spans) or len(set(spans)) != len(spans):
            raise ValueError(f"tiers must span strictly more nodes going up; got nodes_per_domain {spans}")
        return self

    @property
    def domain_nodes(self) -> int:
        """Return how many nodes one domain of the plane's top tier spans."""
        return self.tiers[-1].nodes_per_domain


class CollectiveLibrarySpec(Strict):
    """The collective library's software costs on this fabric (the same NPUs run the same library on any plane)."""

    name: str = Field(description="library name, e.g. 'NCCL + DeepEP'")
    launch_us: float = Field(ge=0, description="number, microseconds of software overhead per collective or send")
    all_to_all_launch_us: float = Field(
        ge=0, description="number, microseconds of fixed overhead of an MoE dispatch/combine all-to-all kernel"
    )
    per_peer_us: float = Field(
        ge=0, description="number, microseconds of signalling per destination rank in an all-to-all"
    )


class FabricSpec(Strict):
    """A fabric: `node_count` identical nodes of devices and hosts, joined by planes."""

    name: str = Field(description="fabric name")
    description: str = Field("", description="one line about the fabric")
    node_count: int = Field(gt=0, description="integer count of nodes")
    device: DeviceSpec
    host: HostSpec
    planes: list[PlaneSpec] = Field(min_length=1, description="list of planes")
    collective_library: CollectiveLibrarySpec

    @model_validator(mode="after")
    def _one_plane_per_kind(self) -> FabricSpec:
        kinds = [p.kind for p in self.planes]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ValueError(f"at most one plane of kind {kind!r}; found {kinds.count(kind)}")
        if "scale_up" not in kinds:
            raise ValueError("a fabric needs a scale_up plane (the bus inside a node at least)")
        return self

    def plane(self, kind: PlaneKind) -> PlaneSpec | None:
        """Return the plane of a kind, or None when the fabric has none."""
        return next((p for p in self.planes if p.kind == kind), None)

    @property
    def device_count(self) -> int:
        """Return the number of devices in the fabric."""
        return self.node_count * self.device.devices_per_node

    @property
    def die_count(self) -> int:
        """Return the number of ranks (dies) in the fabric."""
        return self.device_count * self.device.dies_per_device

    @property
    def cpu_count(self) -> int:
        """Return the number of host CPU sockets in the fabric."""
        return self.node_count * self.host.cpus_per_node

    @property
    def scale_up_domain_nodes(self) -> int:
        """Return how many nodes one scale-up domain spans (capped at the fabric's size)."""
        plane = self.plane("scale_up")
        assert plane is not None
        return min(plane.domain_nodes, self.node_count)

    @property
    def scale_up_domain_size(self) -> int:
        """Return how many devices reach each other over the scale-up bus."""
        return self.scale_up_domain_nodes * self.device.devices_per_node

    @property
    def hbm_gib_total(self) -> float:
        """Return the device memory of the whole fabric in GiB."""
        return self.device_count * self.device.hbm_gib

    def summary(self) -> dict[str, object]:
        """Return the headline figures of the fabric as a JSON-ready dict."""
        return {
            "name": self.name,
            "description": self.description,
            "node_count": self.node_count,
            "devices_per_node": self.device.devices_per_node,
            "device_count": self.device_count,
            "dies_per_device": self.device.dies_per_device,
            "die_count": self.die_count,
            "device_kind": self.device.kind,
            "cpu_count": self.cpu_count,
            "cpu_cores_total": self.cpu_count * self.host.cores_per_cpu,
            "dram_gib_total": self.node_count * self.host.dram_gib,
            "scale_up_domain_size": self.scale_up_domain_size,
            "hbm_gib_total": self.hbm_gib_total,
            "peak_tflops_per_device": dict(self.device.peak_tflops),
            "collective_library": self.collective_library.name,
            "planes": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "protocol": p.protocol,
                    "attached": p.attached,
                    "bandwidth_gbs": p.bandwidth_gbs,
                    "domain_nodes": min(p.domain_nodes, self.node_count),
                    "tiers": [t.model_dump() for t in p.tiers],
                }
                for p in self.planes
            ],
        }
