"""The `ray` site: a shape's deployments on a Ray cluster, one placement group per slice, engines as Ray actors.

`RaySite(site)` connects to the cluster at `site.ray_address` (else `$RAY_ADDRESS`, else "auto"). For each
`Launch` it makes a placement group with the launch's strategy (STRICT_PACK, PACK or SPREAD) over the slice's
devices — `{"CPU": 1}` for device kind "cpu", `{"GPU": 1}` for "cuda", a custom resource named after the kind
otherwise (`{"NPU": 1}` for "npu"): one such bundle per device for the builtin engine, one bundle holding all of
them for vLLM. A group the cluster can never hold fails at once, one that is still pending after
`place_timeout_s` fails too; both name what the cluster lacks, and the group is removed.

What runs where. Each deployment has one actor in bundle 0 of its group, which serves its OpenAI API.

The builtin engine (`engine: matrixstack`): the engine actor (`EngineActor`) builds the deployment with
`engine.server.build_deployment` as `matrixstack engine serve` does and serves it over HTTP.

- One worker (no expert parallelism): the engine actor takes bundle 0's device and runs the model itself
  (`len(devices)` torch threads on "cpu"; the bundle's GPU on "cuda"); the other bundles reserve their devices.
- W > 1 workers: the engine actor is only the driver (scheduler, sampling bookkeeping, HTTP) and holds no
  resource; expert-parallel rank r is its own Ray actor (`EpRankActor`, named `matrixstack-rank:NAME:TOKEN:R:N`)
  in bundle r with that bundle's device (one torch thread on "cpu"; on "cuda" the bundle's GPU, the only one Ray
  shows it, with NCCL between the ranks; gloo on CPU). The engine actor's `ExpertParallelRunner` starts them
  through a `TcpLauncher` (`engine.ep_launch`): each rank connects back to a listener on the engine actor's node IP
  and runs the same worker loop as a local rank, so the runner's protocol and failure handling are unchanged (a
  rank whose actor dies shows as its connections closing; the runner fails the step with `WorkerError`, kills the
  other rank actors and starts fresh ones in the same bundles at the next step). The torch.distributed rendezvous
  is on the engine actor's node IP, hosted by rank 0, which bundle 0 puts on the same node. A deployment needs a
  bundle per worker (workers <= devices); bundles past the last rank reserve their devices. Ranks on several
  nodes (PACK or SPREAD groups) reach each other over the nodes' IPs; only single-node clusters are tested.

vLLM (`engine: vllm`): the vLLM actor (`VllmActor`, named `matrixstack-vllm:NAME:TOKEN`) takes the group's one
bundle — every device of the slice — and runs vLLM's OpenAI server as a subprocess on its node, started as the
local site starts it (`stack.vllm_launch`: the model's Hugging Face folder, exported from packaged weights into
the node's data dir; the plan's tp/pp/dp/ep; max-num-seqs, max-model-len and dtype from engine_args; vLLM's own
venv, the driver's `lanes.vllm_env.vllm_venv()`, which must be at the same path on every node) and supervised
there (`stack.supervise`: restarted with backoff when it exits). GPUs are the ones Ray assigned the actor
(`ray.get_gpu_ids()` as CUDA_VISIBLE_DEVICES); CPU cores are the ones the slice names (the server's affinity and
vLLM's thread binding). vLLM runs on one node: a vllm slice spanning several nodes (a PACK or SPREAD launch) is
refused, naming the fix. Its output goes to the node's `data_dir()/logs/NAME.log`, whose end a failed start
reports. A restart is told to the driver, which tells `start`'s `on_status` (`restarting`, then `running`).
The server is in a process group of its own, which `close()` stops whole, and dies with its actor
(`stack.supervise`: the parent-death signal). A builtin engine actor that dies is not restarted.

Every engine requires its deployment's secret on /v1 (`site.engine_secret_env`): derived here on the driver, which
holds the data key, and handed to the actor's `start` (the builtin engine's app checks it; vLLM gets VLLM_API_KEY).

The actor serves on a free port of its node's IP; `start` returns `Started(name, http://NODE_IP:PORT/v1)` once
the URL's `/health` answers from here. `stop()` closes the engines (vLLM: its server and every process it started),
kills the actors, removes the groups and disconnects, leaving the cluster running; calling it again does nothing.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

from matrixstack.datakey import private_dir
from matrixstack.errors import UserError
from matrixstack.lanes.vllm import VLLM_START_TIMEOUT_S, vllm_available
from matrixstack.lanes.vllm_env import VENV_SETTING, missing_vllm_message, vllm_venv
from matrixstack.paths import data_dir
from matrixstack.portal.deployment_service import engine_secret
from matrixstack.stack.site import ENGINE_DEVICE_KINDS, Launch, Started, StatusCallback, engine_secret_env
from matrixstack.stack.spec import WEIGHTS_PACKAGED, WEIGHTS_RANDOM, SiteShape
from matrixstack.stack.supervise import SupervisedProcess
from matrixstack.stack.vllm_launch import check_vllm_model, vllm_command, vllm_env, vllm_launcher, vllm_model_folder

if TYPE_CHECKING:  # the engine (torch) is imported where it runs: in the actors
    from matrixstack.engine.ep_worker import WorkerSpec

RAY_ADDRESS_ENV = "RAY_ADDRESS"
NAMESPACE = "matrixstack"
PROBE_TIMEOUT_S = 5.0  # a TCP connect to host:port before ray.init, which waits minutes for a silent address
PLACE_TIMEOUT_S = 120.0  # how long a feasible placement group may stay pending
START_TIMEOUT_S = 600.0  # building a deployment: worker start-up, weight loading
HEALTH_TIMEOUT_S = 30.0  # from the actor's answer to /health answering here
POLL_S = 0.2
CLOSE_TIMEOUT_S = 30.0  # how long stop() lets an engine close before killing its actor
STATUS_WAIT_S = 60.0  # how long one call for a vLLM actor's next status waits before asking again
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD")


def resource_name(device_kind: str) -> str:
    """Return the Ray resource one device of `device_kind` is: CPU, GPU, or the kind upper-cased (NPU)."""
    return {"cpu": "CPU", "cuda": "GPU"}.get(device_kind, device_kind.upper())


def bundles_for(launch: Launch) -> list[dict[str, float]]:
    """Return the placement group bundles of a launch: one `{RESOURCE: 1}` per device of its slice for the builtin
    engine; for vLLM one bundle `{RESOURCE: DEVICES}` (its server takes them all, on one node)."""
    name = resource_name(launch.device_kind)
    if launch.engine == "vllm":
        return [{name: float(len(launch.devices))}]
    return [{name: 1.0} for _ in launch.devices]


def actor_resources(device_kind: str, devices: int = 1) -> dict[str, Any]:
    """Return the `.options()` resource arguments of an actor that takes `devices` devices of `device_kind`."""
    name = resource_name(device_kind)
    if name == "CPU":
        return {"num_cpus": devices}
    if name == "GPU":
        return {"num_cpus": 0, "num_gpus": devices}
    return {"num_cpus": 0, "resources": {name: devices}}


def actor_placement() -> dict[str, Any]:
    """Return where the calling actor runs: its pid, node id, placement group id and the Ray resources assigned to
    it."""
    context = ray.get_runtime_context()
    return {
        "pid": os.getpid(),
        "node_id": context.get_node_id(),
        "placement_group_id": context.get_placement_group_id(),
        "resources": context.get_assigned_resources(),
    }


class EpRankActor:
    """One expert-parallel rank in its own bundle: `run` connects back to its engine actor and serves steps until the
    deployment lets go of it, and then ends this actor's process (`engine.ep_worker.worker_main` exits it)."""

    def run(self, rank: int, spec: WorkerSpec, address: tuple[str, int], authkey: bytes) -> None:
        """Run rank `rank` of the deployment whose launcher listens at `address`; never returns."""
        from matrixstack.engine.ep_launch import connect_rank

        connect_rank(rank, spec, address, authkey)

    def placement(self) -> dict[str, Any]:
        """Return where this actor runs (`actor_placement`)."""
        return actor_placement()


class RankActors:
    """Starts a deployment's expert-parallel ranks as `EpRankActor`s, rank r in bundle r of its group (the
    `start_rank` of its `TcpLauncher`)."""

    def __init__(self, launch: Launch, group: PlacementGroup, token: str):
        self.launch = launch
        self.group = group
        self.token = token
        self.started = 0  # every actor gets a fresh name: a killed one's name is freed only once it is gone

    def start(self, rank: int, spec: WorkerSpec, address: tuple[str, int], authkey: bytes):
        """Start rank `rank`'s actor running `connect_rank`; return the callable that kills it."""
        self.started += 1
        actor = (
            ray.remote(EpRankActor)
            .options(
                name=f"matrixstack-rank:{self.launch.name}:{self.token}:{rank}:{self.started}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
                max_concurrency=2,  # `placement` answers while `run` serves steps
                **actor_resources(self.launch.device_kind),
            )
            .remote()
        )
        actor.run.remote(rank, spec, address, authkey)
        return lambda: ray.kill(actor)


class EngineActor:
    """One deployment's engine inside a Ray actor: `start()` builds it and serves it, `close()` stops both."""

    def __init__(self, launch: Launch, group: PlacementGroup, token: str):
        self.launch = launch
        self.ranks = RankActors(launch, group, token) if launch.workers > 1 else None
        self.deployment = None
        self.server = None

    def start(self, secret: str) -> str:
        """Build the deployment (its EP ranks as Ray actors), serve it on a free port of this node, its /v1 routes
        requiring `secret`, and return its OpenAI base URL (…/v1)."""
        launch = self.launch
        from matrixstack.engine.config import EngineConfig
        from matrixstack.engine.ep_launch import TcpLauncher
        from matrixstack.engine.server import build_deployment, create_app
        from matrixstack.openai.server import ServerThread

        node_ip = ray.util.get_node_ip_address()
        ep_options = None
        if self.ranks is not None:
            ep_options = {
                "launcher": TcpLauncher(self.ranks.start, host=node_ip),
                "backend": "nccl" if launch.device_kind == "cuda" else "gloo",
                "threads_per_worker": 1,
            }
        elif launch.device_kind == "cpu":
            import torch

            torch.set_num_threads(len(launch.devices))
        limits = {"max_model_len", "num_kv_blocks", "block_size", "max_num_seqs"}
        config = EngineConfig(
            **launch.engine_args.model_dump(include=limits, exclude_none=True)
        )  # the other limits (and an unset max_num_seqs) as `matrixstack engine serve` has them, as on a local site
        self.deployment = build_deployment(
            launch.arch,
            config,
            weights_dir=None if launch.weights in (WEIGHTS_PACKAGED, WEIGHTS_RANDOM) else launch.weights,
            workers=launch.workers,
            model_id=launch.name,
            device={"cpu": "cpu", "cuda": "cuda"}.get(launch.device_kind, "auto"),
            dtype=launch.engine_args.dtype,
            random_weights=launch.weights == WEIGHTS_RANDOM,
            ep_options=ep_options,
        )
        app = create_app(self.deployment.engine, self.deployment.model_id, api_key=secret)
        self.server = ServerThread(app, host=node_ip, port=0).start()
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


class VllmActor:
    """One vllm deployment's OpenAI server, supervised inside a Ray actor that holds its slice's devices: `start()`
    spawns it, `wait_ready()` waits until it answers, `watch()` restarts it when it exits, `close()` stops it. Its
    status changes queue up for `next_status` (the driver relays them to `on_status`)."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self.process: SupervisedProcess | None = None
        self.statuses: queue.Queue[tuple[str, str] | None] = queue.Queue()  # None: closed

    def start(self, secret_env: dict[str, str]) -> str:
        """Spawn vLLM on a free port of this node's IP (see the module docstring), `secret_env` (its secret) added to
        its environment, and return its OpenAI base URL (…/v1) without waiting for it; UserError when its model or
        plan cannot run on vLLM."""
        launch = self.launch
        host = ray.util.get_node_ip_address()
        log_path = data_dir() / "logs" / f"{launch.name}.log"
        private_dir(log_path.parent)
        vllm_model_folder(launch)  # export packaged weights (once per node) before the server starts
        env = {**os.environ, **vllm_env(launch), **secret_env}
        if launch.device_kind == "cuda":  # the GPUs Ray gave this actor, not the slice's indices on its fabric
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in ray.get_gpu_ids())

        def command(port: int) -> list[str]:
            return vllm_command(launch, vllm_launcher(launch, port, host, log_path))

        self.process = SupervisedProcess(
            launch.name, command, env, log_path, host=host, on_status=lambda _name, *told: self.statuses.put(told)
        )
        self.process.spawn()
        return self.process.url

    def wait_ready(self, timeout_s: float) -> None:
        """Return once the server answers /health on this node; UserError (with the end of its log) when it exits
        or does not answer within `timeout_s`."""
        self.process.wait_ready(timeout_s)

    def watch(self) -> None:
        """Start restarting the server with backoff whenever it exits, until `close()`."""
        self.process.watch()

    def next_status(self, timeout_s: float) -> tuple[str, str] | bool:
        """Return the next (status, url) the supervision told, False when none came within `timeout_s`, True once
        the actor is closed."""
        try:
            told = self.statuses.get(timeout=timeout_s)
        except queue.Empty:
            return False
        return True if told is None else told

    def pids(self) -> list[int]:
        """Return this actor's process id, then its vLLM server's (its process group id)."""
        pid = self.process.pid if self.process is not None else None
        return [os.getpid(), *([pid] if pid is not None else [])]

    def placement(self) -> dict[str, Any]:
        """Return where this actor runs (`actor_placement`)."""
        return actor_placement()

    def close(self) -> None:
        """Stop the supervision and the server with every process it started; end the status queue."""
        if self.process is not None:
            self.process.stop()
        self.statuses.put(None)


def _relay_statuses(name: str, actor: Any, on_status: StatusCallback) -> None:
    """Tell `on_status` each status the vLLM actor of deployment `name` reports, until it is closed or gone."""
    while True:
        try:
            told = ray.get(actor.next_status.remote(STATUS_WAIT_S), timeout=STATUS_WAIT_S + CLOSE_TIMEOUT_S)
        except GetTimeoutError:
            continue
        except (RayTaskError, RayActorError):
            return
        if told is True:
            return
        if told is not False:
            on_status(name, *told)


def check_vllm_launch(launch: Launch) -> None:
    """Return None when the ray site can run `launch` on vLLM; UserError naming the deployment and the fix when its
    slice spans several nodes, its devices are not CPU cores or CUDA GPUs, it has no model for vLLM, vLLM is not
    installed, or its slice has fewer cores than vLLM ranks."""
    if launch.strategy != "STRICT_PACK":
        raise UserError(
            f"deployment {launch.name}: its slice of {len(launch.devices)} devices spans several nodes "
            f"({launch.strategy}), but the ray site runs vLLM as one server on one node; ask for devices on one "
            "node (a slice no larger than a node), or render the shape for k8s (`matrixstack stack render k8s "
            "SHAPE --out DIR`), which spreads vLLM's data-parallel ranks over nodes"
        )
    if launch.device_kind not in ENGINE_DEVICE_KINDS:
        raise UserError(
            f"deployment {launch.name} asks for {launch.device_kind} devices; the ray site runs vLLM on CPU cores or "
            "CUDA GPUs; render the shape for k8s (`matrixstack stack render k8s SHAPE --out DIR`)"
        )
    check_vllm_model(launch.name, launch.arch, launch.weights)
    if not vllm_available():
        raise UserError(f"deployment {launch.name} runs engine vllm: {missing_vllm_message(vllm_venv())}")
    vllm_env(launch)  # a slice with fewer cores than vLLM ranks is refused here, before anything is placed


@dataclass
class _Running:
    """What the site started for one launch."""

    launch: Launch
    group: PlacementGroup
    actors: list[Any] = field(default_factory=list)  # the engine actor or the vLLM actor
    relay: threading.Thread | None = None  # a vLLM actor's statuses to on_status


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

    def start(self, launches: list[Launch], on_status: StatusCallback | None = None) -> list[Started]:
        """Start every launch on the cluster and return them running, in order; UserError (after stopping what
        this call started) when one cannot be placed or does not come up. From then on a vLLM server that exits is
        restarted in its actor, and `on_status` told (`stack.site`)."""
        for launch in launches:
            if launch.strategy not in STRATEGIES:
                raise UserError(f"deployment {launch.name}: strategy {launch.strategy!r} is not one of {STRATEGIES}")
            if launch.engine == "vllm":
                check_vllm_launch(launch)
            elif launch.workers > len(launch.devices):
                raise UserError(
                    f"deployment {launch.name}: its {launch.workers} expert-parallel workers take a device (a bundle "
                    f"of its placement group) each, but its slice has {len(launch.devices)}; ask for a larger slice"
                )
        self.connect()
        try:
            return [self._start_one(launch, on_status) for launch in launches]
        except BaseException:
            self.stop()
            raise

    def _start_one(self, launch: Launch, on_status: StatusCallback | None) -> Started:
        token = uuid.uuid4().hex[:8]
        group = placement_group(
            bundles_for(launch), strategy=launch.strategy, name=f"matrixstack:{launch.name}:{token}"
        )
        running = _Running(launch, group)
        self._running.append(running)
        self._place(launch, group)
        if launch.engine == "vllm":
            return self._start_vllm(running, token, on_status)
        # One worker: the engine runs the model on bundle 0's device. More: the ranks take the devices, the engine
        # actor (the driver) none; it still sits in bundle 0, on rank 0's node, where the rendezvous is.
        resources = actor_resources(launch.device_kind) if launch.workers == 1 else {"num_cpus": 0}
        engine = (
            ray.remote(EngineActor)
            .options(
                name=f"matrixstack-engine:{launch.name}:{token}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
                **resources,
            )
            .remote(launch, group, token)
        )
        running.actors.append(engine)
        url = self._get(launch, engine.start.remote(engine_secret(launch.name)))
        self._await_health(launch, url)
        return Started(launch.name, url)

    def _start_vllm(self, running: _Running, token: str, on_status: StatusCallback | None) -> Started:
        """Start the vLLM actor of a placed launch in bundle 0 with all its devices, wait until its server answers
        there and here, then let it restart the server and relay its statuses to `on_status`."""
        launch = running.launch
        actor = (
            ray.remote(VllmActor)
            .options(
                name=f"matrixstack-vllm:{launch.name}:{token}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(running.group, placement_group_bundle_index=0),
                max_concurrency=4,  # next_status waits while the other calls answer
                runtime_env={"env_vars": {VENV_SETTING: str(vllm_venv())}},  # the same path on every node
                **actor_resources(launch.device_kind, len(launch.devices)),
            )
            .remote(launch)
        )
        running.actors.append(actor)
        url = self._get(launch, actor.start.remote(engine_secret_env(launch)))
        self._get(launch, actor.wait_ready.remote(VLLM_START_TIMEOUT_S), VLLM_START_TIMEOUT_S + CLOSE_TIMEOUT_S)
        self._await_health(launch, url)
        self._get(launch, actor.watch.remote())
        if on_status is not None:
            running.relay = threading.Thread(
                target=_relay_statuses,
                args=(launch.name, actor, on_status),
                name=f"ray-status-{launch.name}",
                daemon=True,
            )
            running.relay.start()
        return Started(launch.name, url)

    def _place(self, launch: Launch, group: PlacementGroup) -> None:
        """Wait until the group is placed; UserError naming what the cluster lacks when it cannot be."""
        deadline = time.monotonic() + self.place_timeout_s
        while not group.wait(timeout_seconds=POLL_S):
            stats = placement_group_table(group).get("stats", {})
            infeasible = stats.get("scheduling_state") == "INFEASIBLE"
            if infeasible or time.monotonic() > deadline:
                why = "can never be placed" if infeasible else f"was not placed within {self.place_timeout_s:g} s"
                bundles = bundles_for(launch)
                ((name, count),) = bundles[0].items()
                raise UserError(
                    f"deployment {launch.name}: its placement group ({len(bundles)} x {{{name}: {count:g}}}, "
                    f"{launch.strategy}) {why}: {_describe_lack(launch)}; "
                    "free or add devices, or ask for a smaller slice"
                )

    def _get(self, launch: Launch, refs: Any, timeout_s: float = START_TIMEOUT_S) -> Any:
        """Return `ray.get(refs)`; UserError naming the deployment when its actor failed, died or did not answer
        within `timeout_s`."""
        try:
            return ray.get(refs, timeout=timeout_s)
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            if isinstance(cause, UserError):  # named once: the actor's own errors may name the deployment
                named = f"deployment {launch.name}" in str(cause)
                raise UserError(str(cause) if named else f"deployment {launch.name}: {cause}") from None
            raise UserError(
                f"deployment {launch.name} did not come up on the Ray cluster: {type(cause).__name__}: {cause}"
            ) from None
        except RayActorError as exc:
            raise UserError(f"deployment {launch.name}: its engine actor died while starting: {exc}") from None
        except GetTimeoutError:
            raise UserError(
                f"deployment {launch.name} did not come up on the Ray cluster within {timeout_s:g} s"
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
        """Return, per running deployment, its actor's process id and then its EP ranks' (builtin engine) or its
        vLLM server's."""
        return {r.launch.name: ray.get(r.actors[0].pids.remote(), timeout=CLOSE_TIMEOUT_S) for r in self._running}

    def stop(self) -> None:
        """Close the engines (a vLLM server with every process it started), kill the actors, remove the groups and
        disconnect (the cluster keeps running)."""
        running, self._running = self._running, []
        for r in running:
            if r.actors:
                try:
                    ray.get(r.actors[0].close.remote(), timeout=CLOSE_TIMEOUT_S)
                except (RayTaskError, RayActorError, GetTimeoutError):
                    pass  # killed below either way
            for actor in r.actors:
                ray.kill(actor)
            if r.relay is not None:
                r.relay.join(timeout=CLOSE_TIMEOUT_S)  # it ends with the actor's close (or its death)
            remove_placement_group(r.group)
        if self._connected:
            ray.shutdown()
            self._connected = False
