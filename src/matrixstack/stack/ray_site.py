"""The `ray` site: a shape's deployments on a Ray cluster, one placement group per slice, engines as Ray actors.

`RaySite(site)` connects to the cluster at `site.ray_address` (else `$RAY_ADDRESS`, else "auto"). For each
`Launch` it makes a placement group with one bundle per device of the slice — `{"CPU": 1}` for device kind
"cpu", `{"GPU": 1}` for "cuda", a custom resource named after the kind otherwise (`{"NPU": 1}` for "npu") —
with the launch's strategy (STRICT_PACK, PACK or SPREAD). A group the cluster can never hold fails at once, one
that is still pending after `place_timeout_s` fails too; both name what the cluster lacks, and the group is
removed.

One engine actor per deployment, in bundle 0. The expert-parallel runner (`engine.ep`) drives its ranks as
child processes over pipes it waits on together with the processes' sentinels (that is how it notices a dead
rank within moments and kills the rest); making each rank a Ray actor would replace that whole protocol and its
failure handling, so the actor builds the deployment with `engine.server.build_deployment` as `matrixstack
engine serve` does, its EP ranks are its children, and bundles 1..N-1 reserve their devices. Consequently the
ranks share one node: a multi-worker deployment whose bundles Ray put on several nodes is refused (use
STRICT_PACK). On "cuda" the ranks need one GPU each, and Ray only shows an actor the GPUs of its own bundle, so
each other bundle gets a small holder actor that takes its GPU and reports the id; the engine actor makes the
union visible (CUDA_VISIBLE_DEVICES) before it starts its ranks. CPU bundles have no device ids in Ray: they
reserve cores, and the engine runs `len(devices)` torch threads.

The actor serves the OpenAI API on a free port of its node's IP (`engine.http.ServerThread`); `start` returns
`Started(name, http://NODE_IP:PORT/v1)` once the URL's `/health` answers from here. `stop()` closes the engines,
kills the actors, removes the groups and disconnects, leaving the cluster running; calling it again does nothing.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from matrixstack.errors import UserError
from matrixstack.stack.site import Launch, Started
from matrixstack.stack.spec import WEIGHTS_PACKAGED, WEIGHTS_RANDOM, SiteShape

RAY_ADDRESS_ENV = "RAY_ADDRESS"
NAMESPACE = "matrixstack"
PROBE_TIMEOUT_S = 5.0  # a TCP connect to host:port before ray.init, which waits minutes for a silent address
PLACE_TIMEOUT_S = 120.0  # how long a feasible placement group may stay pending
START_TIMEOUT_S = 600.0  # building a deployment: worker start-up, weight loading
HEALTH_TIMEOUT_S = 30.0  # from the actor's answer to /health answering here
POLL_S = 0.2
CLOSE_TIMEOUT_S = 30.0  # how long stop() lets an engine close before killing its actor
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD")


def resource_name(device_kind: str) -> str:
    """Return the Ray resource one device of `device_kind` is: CPU, GPU, or the kind upper-cased (NPU)."""
    return {"cpu": "CPU", "cuda": "GPU"}.get(device_kind, device_kind.upper())


def bundles_for(launch: Launch) -> list[dict[str, float]]:
    """Return the placement group bundles of a launch: one `{RESOURCE: 1}` per device of its slice."""
    return [{resource_name(launch.device_kind): 1.0} for _ in launch.devices]


def actor_resources(device_kind: str) -> dict[str, Any]:
    """Return the `.options()` resource arguments of an actor that takes one device of `device_kind`."""
    name = resource_name(device_kind)
    if name == "CPU":
        return {"num_cpus": 1}
    if name == "GPU":
        return {"num_cpus": 0, "num_gpus": 1}
    return {"num_cpus": 0, "resources": {name: 1}}


class EngineActor:
    """One deployment's engine inside a Ray actor: `start()` builds it and serves it, `close()` stops both."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self.deployment = None
        self.server = None

    def start(self, gpu_ids: list[str]) -> str:
        """Build the deployment, serve it on a free port of this node and return its OpenAI base URL (…/v1).

        `gpu_ids` are the GPUs of the group's other bundles (cuda): they join this actor's own for the EP ranks.
        """
        launch = self.launch
        if gpu_ids:
            own = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(own + gpu_ids)
        from matrixstack.engine.config import EngineConfig
        from matrixstack.engine.http import ServerThread
        from matrixstack.engine.server import build_deployment, create_app

        if launch.device_kind == "cpu":
            import torch

            torch.set_num_threads(len(launch.devices))
        args = launch.engine_args
        config = EngineConfig(
            max_model_len=args.max_model_len,
            num_kv_blocks=args.num_kv_blocks,
            block_size=args.block_size,
            max_num_seqs=args.max_num_seqs,
        )  # the other limits as `matrixstack engine serve` has them by default, as on a local site
        self.deployment = build_deployment(
            launch.arch,
            config,
            weights_dir=None if launch.weights in (WEIGHTS_PACKAGED, WEIGHTS_RANDOM) else launch.weights,
            workers=launch.workers,
            model_id=launch.name,
            device={"cpu": "cpu", "cuda": "cuda"}.get(launch.device_kind, "auto"),
            dtype=args.dtype,
            random_weights=launch.weights == WEIGHTS_RANDOM,
        )
        app = create_app(self.deployment.engine, self.deployment.model_id)
        self.server = ServerThread(app, host=ray.util.get_node_ip_address(), port=0).start()
        return f"{self.server.url}/v1"

    def pids(self) -> list[int]:
        """Return this actor's process id, then its expert-parallel ranks' (if any)."""
        runner = self.deployment.runner if self.deployment is not None else None
        return [os.getpid(), *getattr(runner, "worker_pids", [])]

    def close(self) -> None:
        """Stop serving, then stop the engine and its ranks."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.deployment is not None:
            self.deployment.close()
            self.deployment = None


class DeviceHolder:
    """Holds one device bundle of a group and says which accelerator it got (cuda bundles 1..N-1)."""

    def gpu_ids(self) -> list[str]:
        """Return the ids of the GPUs Ray gave this actor."""
        return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


@dataclass
class _Running:
    """What the site started for one launch."""

    launch: Launch
    group: PlacementGroup
    actors: list[Any] = field(default_factory=list)  # the engine actor first, then the holders


def _probe(address: str) -> None:
    """Raise UserError when `address` is HOST:PORT and nothing listens there (ray.init would wait minutes)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(
            f"no Ray cluster at {address} ({exc.strerror or exc}); start one with `ray start --head` or set ray_address"
        ) from None


def _describe_lack(launch: Launch) -> str:
    """Return what the cluster lacks for the launch's group, in words, from its total and free resources."""
    name = resource_name(launch.device_kind)
    wanted = len(launch.devices)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = sum(n["Resources"].get(name, 0.0) for n in nodes)
    largest = max((n["Resources"].get(name, 0.0) for n in nodes), default=0.0)
    free = ray.available_resources().get(name, 0.0)
    if total == 0:
        return f"the cluster has no {name} resource at all (start nodes with --resources '{{\"{name}\": N}}')"
    where = " on one node" if launch.strategy == "STRICT_PACK" else ""
    return (
        f"it needs {wanted} {name}{where}; the cluster has {total:g} {name} in all ({largest:g} on its largest "
        f"node), {free:g} free now"
    )


class RaySite:
    """Runs launches on a Ray cluster (see the module docstring)."""

    kind = "ray"

    def __init__(self, site: SiteShape, place_timeout_s: float = PLACE_TIMEOUT_S):
        self.site = site
        self.address = site.ray_address or os.environ.get(RAY_ADDRESS_ENV) or "auto"
        self.place_timeout_s = place_timeout_s
        self._running: list[_Running] = []
        self._connected = False  # this site called ray.init (and so calls ray.shutdown)

    # -- connection ----------------------------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect to the cluster unless this process already is; UserError when no cluster answers."""
        if ray.is_initialized():
            return
        _probe(self.address)
        try:
            ray.init(address=self.address, namespace=NAMESPACE, logging_level="WARNING")
        except ConnectionError:
            raise UserError(
                f"no Ray cluster at {self.address}; start one with `ray start --head` or set ray_address (or "
                f"${RAY_ADDRESS_ENV})"
            ) from None
        self._connected = True

    # -- start ---------------------------------------------------------------------------------------------------

    def start(self, launches: list[Launch]) -> list[Started]:
        """Start every launch on the cluster and return them running, in order; UserError (after stopping what
        this call started) when one cannot be placed or does not come up."""
        for launch in launches:
            if launch.engine != "matrixstack":
                raise UserError(
                    f"deployment {launch.name}: the ray site runs the builtin engine (engine: matrixstack); "
                    f"as the local site does; a {launch.engine} deployment runs on k8s: `matrixstack stack render k8s`"
                )
            if launch.strategy not in STRATEGIES:
                raise UserError(f"deployment {launch.name}: strategy {launch.strategy!r} is not one of {STRATEGIES}")
        self.connect()
        try:
            return [self._start_one(launch) for launch in launches]
        except BaseException:
            self.stop()
            raise

    def _start_one(self, launch: Launch) -> Started:
        token = uuid.uuid4().hex[:8]
        group = placement_group(
            bundles_for(launch), strategy=launch.strategy, name=f"matrixstack:{launch.name}:{token}"
        )
        running = _Running(launch, group)
        self._running.append(running)
        self._place(launch, group)
        nodes = set(placement_group_table(group)["bundles_to_node_id"].values())
        if launch.workers > 1 and len(nodes) > 1:
            raise UserError(
                f"deployment {launch.name}: its {launch.workers} expert-parallel workers run on one node, but "
                f"Ray placed its {launch.strategy} group on {len(nodes)} nodes; use strategy STRICT_PACK "
                "(slice constraints within_domain)"
            )

        def in_bundle(index: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)

        resources = actor_resources(launch.device_kind)
        engine = (
            ray.remote(EngineActor)
            .options(name=f"matrixstack-engine:{launch.name}:{token}", scheduling_strategy=in_bundle(0), **resources)
            .remote(launch)
        )
        running.actors.append(engine)
        gpu_ids: list[str] = []
        if launch.device_kind == "cuda" and launch.workers > 1:
            holders = [
                ray.remote(DeviceHolder)
                .options(
                    name=f"matrixstack-device:{launch.name}:{token}:{i}", scheduling_strategy=in_bundle(i), **resources
                )
                .remote()
                for i in range(1, len(launch.devices))
            ]
            running.actors.extend(holders)
            gpu_ids = [gpu for ids in self._get(launch, [h.gpu_ids.remote() for h in holders]) for gpu in ids]
        url = self._get(launch, engine.start.remote(gpu_ids))
        self._await_health(launch, url)
        return Started(launch.name, url)

    def _place(self, launch: Launch, group: PlacementGroup) -> None:
        """Wait until the group is placed; UserError naming what the cluster lacks when it cannot be."""
        deadline = time.monotonic() + self.place_timeout_s
        while not group.wait(timeout_seconds=POLL_S):
            stats = placement_group_table(group).get("stats", {})
            infeasible = stats.get("scheduling_state") == "INFEASIBLE"
            if infeasible or time.monotonic() > deadline:
                why = "can never be placed" if infeasible else f"was not placed within {self.place_timeout_s:g} s"
                raise UserError(
                    f"deployment {launch.name}: its placement group ({len(launch.devices)} x "
                    f"{{{resource_name(launch.device_kind)}: 1}}, {launch.strategy}) {why}: {_describe_lack(launch)}; "
                    "free or add devices, or ask for a smaller slice"
                )

    def _get(self, launch: Launch, refs: Any) -> Any:
        """Return `ray.get(refs)`; UserError naming the deployment when its actor failed, died or timed out."""
        try:
            return ray.get(refs, timeout=START_TIMEOUT_S)
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            if isinstance(cause, UserError):
                raise UserError(f"deployment {launch.name}: {cause}") from None
            raise UserError(
                f"deployment {launch.name} did not come up on the Ray cluster: {type(cause).__name__}: {cause}"
            ) from None
        except RayActorError as exc:
            raise UserError(f"deployment {launch.name}: its engine actor died while starting: {exc}") from None
        except GetTimeoutError:
            raise UserError(
                f"deployment {launch.name} did not come up on the Ray cluster within {START_TIMEOUT_S:g} s"
            ) from None

    @staticmethod
    def _await_health(launch: Launch, url: str) -> None:
        """Return once `url`'s /health answers 200 from here; UserError when it does not in time."""
        health = url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            try:
                response = httpx.get(health, timeout=POLL_S * 10)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = str(exc) or type(exc).__name__
            time.sleep(POLL_S)
        raise UserError(
            f"deployment {launch.name}: its engine on the Ray cluster does not answer {health} from here ({last}); "
            "check that this machine reaches the cluster's node addresses"
        )

    # -- inspection and stop -------------------------------------------------------------------------------------

    def placement_groups(self) -> dict[str, PlacementGroup]:
        """Return the placement group of each running deployment, by deployment name."""
        return {r.launch.name: r.group for r in self._running}

    def engine_pids(self) -> dict[str, list[int]]:
        """Return, per running deployment, its engine actor's process id and then its EP ranks'."""
        return {r.launch.name: ray.get(r.actors[0].pids.remote(), timeout=CLOSE_TIMEOUT_S) for r in self._running}

    def stop(self) -> None:
        """Close the engines, kill the actors, remove the groups and disconnect (the cluster keeps running)."""
        running, self._running = self._running, []
        for r in running:
            if r.actors:
                try:
                    ray.get(r.actors[0].close.remote(), timeout=CLOSE_TIMEOUT_S)
                except (RayTaskError, RayActorError, GetTimeoutError):
                    pass  # killed below either way
            for actor in r.actors:
                ray.kill(actor)
            remove_placement_group(r.group)
        if self._connected:
            ray.shutdown()
            self._connected = False
