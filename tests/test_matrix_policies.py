"""Matrix layer, in memory: the tier ladder, the allocator's bookkeeping and the three placement policies."""

from __future__ import annotations

import random

import pytest

from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.allocator import MatrixPool
from matrixstack.matrix.policies import Placement, extend, never_fits, place, resolve_ceilings, shrink
from matrixstack.matrix.spec import SliceRequest
from matrixstack.matrix.topology import topology_of

CM384 = load_fabric("cloudmatrix384")
DGX = load_fabric("dgx-h800")


def _pool(*fabrics):
    return MatrixPool(list(fabrics or [CM384]))


def _place(pool, policy, devices, max_tier=None, within_domain=True, **kw):
    found = place(pool, policy, devices, resolve_ceilings(pool, max_tier, within_domain), **kw)
    if isinstance(found, Placement):
        pool.take(found.fabric, found.devices, found.hosts)
    return found


def _nodes(found: Placement, dpn: int = 8) -> list[int]:
    return sorted({d // dpn for d in found.devices})


def test_ladders_follow_the_fabric_planes():
    cm = topology_of(CM384)
    assert [(t.number, t.name, t.nodes_per_domain, t.scale_up) for t in cm.tiers] == [
        (1, "L1", 1, True),
        (2, "L2", 48, True),
    ]
    dgx = topology_of(DGX)
    assert [(t.name, t.nodes_per_domain, t.scale_up) for t in dgx.tiers] == [
        ("nvswitch", 1, True),
        ("leaf", 16, False),
        ("spine", 32, False),
    ]
    assert [t.nodes_per_domain for t in topology_of(load_fabric("gb200-nvl72")).tiers] == [18]
    assert cm.ceiling(None, True) == 1 and cm.ceiling("l1", True) == 0 and cm.ceiling("2", True) == 1
    assert dgx.ceiling(None, True) == 0 and dgx.ceiling(None, False) == 2
    with pytest.raises(UserError, match="above its scale-up domain"):
        dgx.ceiling("leaf", True)
    with pytest.raises(UserError, match="has no tier 'L3'.*1=L1 \\(1 node\\), 2=L2 \\(48 nodes\\)"):
        cm.ceiling("L3", True)


def test_matrix_packs_twelve_devices_into_two_nodes_of_one_domain():
    pool = _pool()
    first = _place(pool, "matrix", 12)
    assert len(first.devices) == 12 and _nodes(first) == [0, 1]
    # the partly used node 1 (4 free) takes the next small slice: a tight fit, whole nodes stay whole
    second = _place(pool, "matrix", 3)
    assert _nodes(second) == [1]
    assert pool.stats().whole_free_nodes == 46


def test_server_takes_whole_nodes():
    pool = _pool()
    found = _place(pool, "server", 12)
    assert len(found.devices) == 16 and _nodes(found) == [0, 1]
    one = _place(pool, "server", 1)
    assert len(one.devices) == 8 and pool.stats().allocated == 24


def test_tiered_picks_tier_one_when_it_fits_and_fills_nodes_in_order():
    pool = _pool()
    _place(pool, "matrix", 5)  # node 0: 3 free
    small = _place(pool, "tiered", 3)
    assert _nodes(small) == [0]  # tier 1 (one node) fits: the tightest node
    big = _place(pool, "tiered", 10)
    assert _nodes(big) == [1, 2]  # tier 2: nodes in index order
    # nodes 0 and 1 with 3 and 2 free: matrix takes a whole node and closes node 1, tiered fills nodes in order
    for policy, nodes in (("matrix", [1, 2]), ("tiered", [0, 1, 2])):
        other = _pool()
        _place(other, "matrix", 5)
        _place(other, "matrix", 6)
        assert _nodes(_place(other, policy, 10)) == nodes


def test_constraints_max_tier_whole_nodes_and_domains():
    pool = _pool()
    reason = _place(pool, "matrix", 9, max_tier=1)
    assert isinstance(reason, str) and "does not fit in any domain" in reason and "largest holds 8" in reason
    found = _place(pool, "matrix", 6, max_tier="L1")
    assert len(_nodes(found)) == 1
    whole = _place(pool, "matrix", 9, whole_nodes=True)
    assert len(whole.devices) == 16 and all(pool.fabrics[0].free_count[n] == 0 for n in _nodes(whole))
    # a DGX's scale-up domain is one node: 16 GPUs need --cross-domain, then they share a leaf (tier 2)
    dgx = _pool(DGX)
    assert "does not fit" in _place(dgx, "matrix", 16)
    across = _place(dgx, "matrix", 16, within_domain=False)
    assert _nodes(across) == [0, 1]


def test_leaf_constraint_keeps_a_slice_under_one_leaf():
    dgx = _pool(DGX)
    _place(dgx, "server", 8, within_domain=False)  # node 0 taken: the first leaf has 15 whole nodes
    found = _place(dgx, "server", 16 * 8, max_tier="leaf", within_domain=False)
    assert isinstance(found, Placement) and _nodes(found) == list(range(16, 32))
    refused = _place(dgx, "server", 17 * 8, max_tier="leaf", within_domain=False)
    assert "does not fit" in refused


def test_dies_round_up_to_whole_devices():
    request = SliceRequest(dies=5)
    assert request.device_count(2) == 3 and request.device_count(1) == 5
    with pytest.raises(ValueError, match="exactly one of devices or dies"):
        SliceRequest(devices=2, dies=4)


def test_host_cpus_and_dram_are_pooled_over_the_scale_up_domain():
    pool = _pool()
    found = _place(pool, "matrix", 2, host_cpus=6, dram_gib=3000.0)
    hosts = {node: (cpus, dram) for node, cpus, dram in found.hosts}
    assert sum(c for c, _ in hosts.values()) == 6 and sum(d for _, d in hosts.values()) == pytest.approx(3000)
    assert _nodes(found)[0] in hosts  # the slice's own node first
    # a DGX pools nothing across servers: more CPUs than one node has cannot come with a 1-GPU slice
    dgx = _pool(DGX)
    why = never_fits(dgx, "matrix", 1, resolve_ceilings(dgx, None, True), host_cpus=3)
    assert "1 device, 3 host CPUs does not fit" in why
    assert isinstance(_place(dgx, "matrix", 1, host_cpus=3), str)
    # server supply owns whole nodes, host resources included, and needs more nodes for more CPUs
    server = _place(pool, "server", 1, host_cpus=6)
    assert len(server.devices) == 16 and sum(c for _, c, _ in server.hosts) == 8


def test_failures_are_never_handed_out_and_repair_returns_them():
    pool = _pool()
    for device in range(8):
        pool.fail(0, device)
    assert pool.stats().failed == 8 and pool.stats().free == 376
    found = _place(pool, "server", 8)
    assert _nodes(found) == [1]
    assert pool.fail(0, 9) is False  # held by a slice: stays taken, counted failed
    pool.give_back(0, found.devices)
    assert not pool.is_free(0, 9) and pool.is_failed(0, 9)
    pool.repair(0, 9)
    assert pool.is_free(0, 9)


def test_extend_prefers_the_slice_nodes_and_shrink_frees_whole_nodes():
    pool = _pool()
    found = _place(pool, "matrix", 5)
    ceiling = resolve_ceilings(pool, None, True)[0]
    more = extend(pool, "matrix", 0, found.devices, 5, ceiling)
    assert {d // 8 for d in more} == {0, 1} and sum(1 for d in more if d // 8 == 0) == 3
    fs = pool.fabrics[0]
    held = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert shrink(fs, held, 2, whole_nodes=False) == (8, 9)  # the node with fewest of the slice's devices
    assert shrink(fs, tuple(range(24)), 8, whole_nodes=True) == tuple(range(16, 24))


def test_fragmentation_counts_free_devices_off_wholly_free_nodes():
    pool = _pool()
    assert pool.stats().fragmentation == 0
    _place(pool, "matrix", 4)
    stats = pool.stats()
    assert stats.fragmentation == pytest.approx(4 / 380)


def test_bookkeeping_matches_a_brute_force_count_under_random_churn():
    fabrics = [CM384, load_fabric("gb200-nvl72"), DGX]
    pool = MatrixPool(fabrics)
    rng = random.Random(3)
    live: list[Placement] = []
    for step in range(600):
        if live and rng.random() < 0.45:
            gone = live.pop(rng.randrange(len(live)))
            pool.give_back(gone.fabric, gone.devices, gone.hosts)
        else:
            policy = rng.choice(["matrix", "server", "tiered"])
            found = _place(pool, policy, rng.choice([1, 2, 3, 5, 8, 12, 30]), host_cpus=rng.choice([0, 0, 1]))
            if isinstance(found, Placement):
                live.append(found)
        if step % 50 == 0:
            held = {(p.fabric, d) for p in live for d in p.devices}
            assert len(held) == sum(len(p.devices) for p in live)  # no device in two slices
            assert pool.stats().allocated == len(held)
            for fs in pool.fabrics:
                for t, counts in enumerate(fs.domain_free):
                    for domain, count in enumerate(counts):
                        nodes = fs.topo.domain_nodes(t, domain)
                        assert count == sum(fs.free_mask[n].bit_count() for n in nodes)
                        assert fs.domain_whole[t][domain] == sum(fs.node_is_whole(n) for n in nodes)
            assert pool.free_index[0] == sorted(pool.free_index[0])
