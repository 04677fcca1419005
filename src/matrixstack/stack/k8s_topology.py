"""Volcano HyperNodes for a shape's fabric: the switch tiers as `topology.volcano.sh/v1alpha1` objects.

The tiers are the matrix layer's tier ladder (`matrix.topology.Topology`), so a HyperNode tier means the same as
a slice's `max_tier`: the scale-up plane's tiers, lowest first, then the scale-out plane's tiers that span more
nodes than the scale-up domain. CloudMatrix384: tier 1 = L1 (one node each, 48 HyperNodes), tier 2 = L2 (one
HyperNode over the 48). A fabric whose scale-up domain is one node (dgx-h100: NVLink inside a server) gets its
higher tiers from the scale-out plane: tier 1 = nvswitch (one node each), tier 2 = leaf (16 nodes over
InfiniBand), tier 3 = spine (32 nodes).

Every copy of the fabric in a pool (`pools[].fabrics: N`) is its own tree; the trees share no root, since a slice
never spans two fabrics. Tier-1 HyperNodes hold Nodes, selected by `labelMatch` on the label `NODE_LABEL`
(`matrixstack.io/fabric-node=<pool>-<fabric index>-<node index>`) that the operator puts on each Kubernetes node,
e.g. `kubectl label node <node> matrixstack.io/fabric-node=main-0-17`; higher tiers hold the HyperNodes of the
tier below by `exactMatch` on their names. HyperNodes are cluster-scoped and named
`<pool>-<fabric index>-t<tier>-<domain>` (e.g. `main-0-t2-0`); `spec.tierName` carries the fabric's tier name.
"""

from __future__ import annotations

import re
from typing import Any

from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.topology import Topology, topology_of
from matrixstack.stack.spec import Shape

HYPERNODE_API = "topology.volcano.sh/v1alpha1"
NODE_LABEL = "matrixstack.io/fabric-node"
LABEL_PREFIX = "matrixstack.io/"
_NOT_DNS = re.compile(r"[^a-z0-9-]+")
LABEL_VALUE_MAX_CHARS = 63


def dns_label(*parts: object) -> str:
    """Return the parts joined by '-' as a DNS-1123 label: lower case, letters, digits and '-', at most 63 chars."""
    text = _NOT_DNS.sub("-", "-".join(str(p) for p in parts).lower()).strip("-")
    return text[:LABEL_VALUE_MAX_CHARS].rstrip("-") or "x"


def node_label_value(pool: str, fabric_index: int, node: int) -> str:
    """Return the value of `NODE_LABEL` the operator puts on the Kubernetes node of this fabric node."""
    return dns_label(pool, fabric_index, node)


def hypernode_name(pool: str, fabric_index: int, tier_number: int, domain: int) -> str:
    """Return the name of the HyperNode of one domain of a tier (1-based tier number)."""
    return dns_label(pool, fabric_index, f"t{tier_number}", domain)


def hypernodes(shape: Shape, fabric: FabricSpec) -> list[dict[str, Any]]:
    """Return the HyperNode objects of every fabric copy of every pool of `shape`: per copy, the top tier first."""
    topo = topology_of(fabric)
    objects: list[dict[str, Any]] = []
    for pool in shape.pools:
        for fabric_index in range(pool.fabrics):
            objects += _tree(topo, shape.name, pool.name, fabric_index)
    return objects


def _tree(topo: Topology, shape_name: str, pool: str, fabric_index: int) -> list[dict[str, Any]]:
    """Return the HyperNodes of one fabric copy, top tier first, domains in node order."""
    objects: list[dict[str, Any]] = []
    for index in reversed(range(len(topo.tiers))):
        tier = topo.tiers[index]
        for domain in range(topo.domain_counts[index]):
            nodes = topo.domain_nodes(index, domain)
            if index == 0:
                members = [_node_member(pool, fabric_index, node) for node in nodes]
            else:
                below = topo.spans[index - 1]
                children = sorted({node // below for node in nodes})
                names = [hypernode_name(pool, fabric_index, index, c) for c in children]
                members = [{"type": "HyperNode", "selector": {"exactMatch": {"name": n}}} for n in names]
            labels = {
                LABEL_PREFIX + "shape": dns_label(shape_name),
                LABEL_PREFIX + "pool": dns_label(pool),
                LABEL_PREFIX + "fabric-index": str(fabric_index),
                LABEL_PREFIX + "tier": str(tier.number),
            }
            objects.append(
                {
                    "apiVersion": HYPERNODE_API,
                    "kind": "HyperNode",
                    "metadata": {"name": hypernode_name(pool, fabric_index, tier.number, domain), "labels": labels},
                    "spec": {"tier": tier.number, "tierName": tier.name, "members": members},
                }
            )
    return objects


def _node_member(pool: str, fabric_index: int, node: int) -> dict[str, Any]:
    """Return a HyperNode member selecting the Kubernetes node labelled as fabric node `node`."""
    value = node_label_value(pool, fabric_index, node)
    return {"type": "Node", "selector": {"labelMatch": {"matchLabels": {NODE_LABEL: value}}}}
