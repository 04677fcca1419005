"""The `k8s` site: a shape rendered as Kubernetes manifests for the Volcano scheduler (`render_k8s`).

Layout of the output folder (`kubectl apply -f DIR` applies the files in this order):

- `00-namespace.yaml`: the Namespace `site.namespace`.
- `01-hypernodes.yaml`: the fabric's switch tiers as Volcano HyperNodes (`stack.k8s_topology`).
- `02-portal.yaml`: a ConfigMap with the shape (`shape.yaml`, as `Shape.dump()`) and the engines' in-cluster URLs
  (`endpoints.yaml`), the portal's Deployment that mounts it, and its Service.
- `10-deployment-<name>.yaml` per deployment: a Volcano PodGroup, a headless Service and a StatefulSet.

The engines are StatefulSets, not Deployments: a gang has a fixed size (the PodGroup's minMember) and a
Deployment's rolling update would start pods outside it; stable ordinals give pod 0 a DNS name
(`<name>-0.<name>.<namespace>.svc`) that the portal routes to and that vLLM's other nodes join.

Pods and devices. The builtin engine runs its expert-parallel workers (the plan's EP degree) as processes of one
pod on the slice's devices, so its slice must fit one node. A vLLM deployment is one vLLM server laid out as the
plan's decode instance (its tp, dp, ep and devices), one pod per node that instance spans (vLLM's multi-node data
parallelism: pod 0 serves the API, the others run `--headless` from their start rank); the plan's prefill/decode
disaggregation and further instances are not rendered (the one server runs both phases). Each pod requests its
share of those devices as the device plugin's resource (`device_resource`), plus its share of the slice's host
CPUs (in cores) and pooled DRAM. The images must hold the `matrixstack` (and, for vLLM, `vllm`) command.

Engine settings. Both lanes take the deployment's `engine_args`: the builtin engine as its own options, vLLM as
`--max-model-len`, `--dtype` and `--max-num-seqs` (the plan's decode batch unless engine_args give one:
`stack.vllm_launch.vllm_flags`), beside the plan's parallel degrees
(`lanes.vllm.VllmLauncher.from_plan`), as the local site starts it (`stack.vllm_launch`). A vLLM pod on CPU cores
also gets vLLM's CPU settings (`vllm_cpu_env`): `VLLM_CPU_KVCACHE_SPACE`, each rank's share of the KV cache the
engine_args hold (`stack.vllm_launch.kv_cache_gib`, as on the local site), and `VLLM_CPU_OMP_THREADS_BIND=auto`
where the local site names the slice's cores: on Kubernetes the cores are the kubelet's to pick (its static CPU
manager gives a pod whose whole-core requests equal its limits cores of its own), and `auto` binds vLLM's threads
to the container's cpuset.

Model files (`model_files`). A weights folder (`weights: /path`) and a registered model's folder (`matrixstack
model add DIR --name N`, named as the deployment's arch) are hostPath volumes mounted read-only at the same path,
so the folder must exist at that path on every node that may run the pod (a shared file system mounted there,
or copied beforehand). With `site.models_claim` the folders come from that PersistentVolumeClaim instead (a
ReadOnlyMany volume of the model store, e.g. NFS or CephFS), mounted read-only at `/models` (`MODELS_DIR`): every
folder a pod needs must then lie under `/models`, as the claim holds it. A builtin-engine pod of a registered
model registers the folder again in the pod (an init container runs `matrixstack model add`, the data directory
an emptyDir), since the arch lives in the registry.
A vLLM deployment of packaged weights (tiny-moe) gets them as a Hugging Face folder written by an init container
(`matrixstack model export ARCH --format hf`) into the pod's emptyDir, as the local site does on its machine.
Random weights are refused for vLLM (`stack.vllm_launch.check_vllm_model`).

PodGroup network topology (Volcano `networkTopology`): a slice kept inside its scale-up domain (`within_domain`,
the default) is `mode: hard` with `highestTierAllowed` = the scale-up domain's top tier; `max_tier` lowers that
ceiling; a slice that may leave its scale-up domain without a `max_tier` is `mode: soft` with the ladder's top
tier: Volcano packs the gang as low in the tree as it can, but places it anyway when no domain has room.

Secrets: an upstream catalog entry's `api_key_env` becomes an environment variable of the portal read from the
Secret `k8s_workloads.UPSTREAM_SECRET` (key = the variable's name); the manifests hold the reference, never the value.
Every engine requires its deployment's secret (`site.engine_secret_env`): MATRIXSTACK_ENGINE_SECRET (builtin) or
VLLM_API_KEY (vLLM) read from the Secret `ENGINE_SECRET` (key = the deployment's DNS name), and the portal derives
the same secrets from its data key, $MATRIXSTACK_SECRET_KEY read from the Secret `DATA_KEY_SECRET`; `matrixstack
stack render k8s` prints the commands that create both (`matrixstack deployment secret NAME` prints a
deployment's secret under the data key in $MATRIXSTACK_SECRET_KEY).
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from matrixstack.arch.loader import arch_names
from matrixstack.arch.registry import registered_model
from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.topology import topology_of
from matrixstack.perf.spec import InstancePlan, Plan
from matrixstack.stack.k8s_topology import dns_label, hypernodes
from matrixstack.stack.k8s_workloads import (
    DATA_DIR,
    ENGINE_PORT,
    MODELS_DIR,
    VLLM_RPC_PORT,
    EngineLayout,
    ModelFiles,
    engine_objects,
    labels_of,
    portal_objects,
)
from matrixstack.stack.site import Launch
from matrixstack.stack.spec import WEIGHTS_PACKAGED, WEIGHTS_RANDOM, DeploymentShape, Shape
from matrixstack.stack.validate import PlannedDeployment, check_shape, shape_fabric
from matrixstack.stack.vllm_launch import check_vllm_model, kv_cache_gib, vllm_flags

NAMESPACE_FILE = "00-namespace.yaml"
HYPERNODES_FILE = "01-hypernodes.yaml"
PORTAL_FILE = "02-portal.yaml"
DEPLOYMENT_PREFIX = "10-deployment-"
HF_EXPORT_DIR = f"{DATA_DIR}/hf"  # where a vLLM pod's init container writes packaged weights as a Hugging Face folder


class _Dumper(yaml.SafeDumper):
    """YAML for kubectl: no anchors or aliases, multi-line strings as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Return `objects` as one multi-document YAML text, keys in the order given."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120)


def device_resource(fabric: FabricSpec) -> str:
    """Return the Kubernetes resource one device of `fabric` is requested as.

    CPU cores (the `local` fabric without GPUs) -> `cpu`; NVIDIA GPUs -> `nvidia.com/gpu` (NVIDIA device plugin);
    Huawei Ascend NPUs -> `huawei.com/Ascend910` (Ascend device plugin, one per NPU package; 910B and 910C are
    both announced under this name); AMD GPUs -> `amd.com/gpu`. UserError for any other device.
    """
    kind, vendor = fabric.device.kind.lower(), fabric.device.vendor.lower()
    if kind.startswith("cpu"):
        return "cpu"
    if vendor == "nvidia":
        return "nvidia.com/gpu"
    if "ascend" in kind:
        return "huawei.com/Ascend910"
    if vendor == "amd":
        return "amd.com/gpu"
    raise UserError(
        f"fabric {fabric.name!r}: no Kubernetes device resource is known for {fabric.device.kind} "
        f"({fabric.device.vendor}); the k8s site knows CPU cores, NVIDIA, Ascend and AMD devices"
    )


def manifests(shape: Shape) -> dict[str, list[dict[str, Any]]]:
    """Return the manifests of `shape` as {file name: objects}, in the order they are applied.

    Raises UserError when the fabric, an arch or a plan cannot be found, or a deployment cannot run on k8s.
    """
    fabric = shape_fabric(shape)
    namespace = shape.site.namespace
    plans = check_shape(shape)
    layouts = [_layout(shape, d, p, fabric) for d, p in zip(shape.deployments, plans, strict=True)]
    files: dict[str, list[dict[str, Any]]] = {
        NAMESPACE_FILE: [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels_of(shape)}}
        ],
        HYPERNODES_FILE: hypernodes(shape, fabric),
        PORTAL_FILE: portal_objects(shape, layouts),
    }
    resource = device_resource(fabric)
    for d, layout in zip(shape.deployments, layouts, strict=True):
        files[f"{DEPLOYMENT_PREFIX}{layout.name}.yaml"] = engine_objects(shape, d, layout, fabric, resource)
    return files


def render_k8s(shape: Shape, out_dir: Path, replace: bool = False) -> list[Path]:
    """Write the manifests of `shape` under `out_dir` (created) and return the files written, in apply order.

    Refuses (UserError) when `out_dir` holds manifests of an earlier render, unless `replace`, which removes them
    first (only files of this layout: 00-namespace, 01-hypernodes, 02-portal and 10-deployment-*.yaml).
    """
    files = manifests(shape)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder")
    earlier = sorted(
        p
        for pattern in (NAMESPACE_FILE, HYPERNODES_FILE, PORTAL_FILE, f"{DEPLOYMENT_PREFIX}*.yaml")
        for p in out_dir.glob(pattern)
    )
    if earlier and not replace:
        raise UserError(f"{out_dir} already holds manifests ({earlier[0].name}, ...); pass --replace to overwrite them")
    for path in earlier:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objects in files.items():
        path = out_dir / name
        path.write_text(to_yaml(objects))
        written.append(path)
    return written


def _layout(shape: Shape, d: DeploymentShape, planned: PlannedDeployment, fabric: FabricSpec) -> EngineLayout:
    """Return how deployment `d` with its plan runs on k8s (see the module docstring); UserError when it cannot."""
    topo = topology_of(fabric)
    per_node = fabric.device.devices_per_node
    instance = planned.plan.decode if isinstance(planned.plan, Plan) else planned.plan
    name = dns_label(d.name)
    files = model_files(d)
    if shape.site.models_claim:
        _check_under_models_dir(d, files, shape.site.models_claim)
    env: dict[str, str] = {}
    if d.engine == "matrixstack":
        devices = d.slice.device_count(fabric.device.dies_per_device)
        if d.slice.constraints.whole_nodes:
            devices = math.ceil(devices / per_node) * per_node
        pods = math.ceil(devices / per_node)
        if pods > 1:
            raise UserError(
                f"deployment {d.name}: the builtin engine runs its workers on one node, but its slice of {devices} "
                f"devices spans {pods} nodes of {fabric.name} ({per_node} devices each); ask for at most "
                f"{per_node} devices or use engine vllm"
            )
        command = _builtin_command(d, planned.workers, fabric, files)
    else:
        devices = instance.devices
        pods = math.ceil(devices / per_node)
        head = f"{name}-0.{name}.{shape.site.namespace}.svc"
        command = _vllm_command(d, instance, fabric, pods, head, files)
        if device_resource(fabric) == "cpu":
            env = vllm_cpu_env(d, instance, fabric.device.dies_per_device)
    c = d.slice.constraints
    ceiling = topo.ceiling(c.max_tier, c.within_domain) + 1
    mode = "soft" if not c.within_domain and c.max_tier is None else "hard"
    return EngineLayout(name, pods, math.ceil(devices / pods), planned.workers, mode, ceiling, command, env, files)


def model_files(d: DeploymentShape) -> ModelFiles:
    """Return where deployment `d`'s pods find its model (see the module docstring); UserError when vLLM has none
    (random weights)."""
    registered = None if d.arch in arch_names() else registered_model(d.arch)
    folders = [] if d.weights in (WEIGHTS_PACKAGED, WEIGHTS_RANDOM) else [d.weights]
    if d.engine == "matrixstack":
        if registered is None:
            return ModelFiles(folders[0] if folders else None, tuple(folders))
        setup = ["matrixstack", "model", "add", registered.folder, "--name", registered.name]
        return ModelFiles(folders[0] if folders else None, (registered.folder, *folders), tuple(setup))
    check_vllm_model(d.name, d.arch, d.weights)
    if folders:
        return ModelFiles(folders[0], tuple(folders))
    if registered is not None:
        return ModelFiles(registered.folder, (registered.folder,))
    out = f"{HF_EXPORT_DIR}/{d.arch}"
    return ModelFiles(out, (), ("matrixstack", "model", "export", d.arch, "--format", "hf", "--out", out))


def _check_under_models_dir(d: DeploymentShape, files: ModelFiles, claim: str) -> None:
    """Raise UserError when a folder deployment `d` needs lies outside MODELS_DIR, where the claim is mounted."""
    for folder in files.host_folders:
        if not PurePosixPath(folder).is_relative_to(MODELS_DIR):
            raise UserError(
                f"deployment {d.name}: its model folder {folder} is not under {MODELS_DIR}, where site.models_claim "
                f"{claim!r} is mounted; give the folder's path inside the claim (e.g. {MODELS_DIR}/NAME), or drop "
                "models_claim to mount node folders"
            )


def vllm_cpu_env(d: DeploymentShape, instance: InstancePlan, dies_per_device: int) -> dict[str, str]:
    """Return vLLM's CPU settings for the pods of deployment `d` running `instance` (see the module docstring):
    each rank's KV cache GiB and thread binding `auto`."""
    launch = Launch(
        name=d.name,
        arch=d.arch,
        weights=d.weights,
        engine=d.engine,
        workers=instance.ep,
        device_kind="cpu",
        devices=(),  # the kubelet's to pick
        strategy="",
        engine_args=d.engine_args,
        plan=instance,
        dies_per_device=dies_per_device,
    )
    return {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib(launch)), "VLLM_CPU_OMP_THREADS_BIND": "auto"}


def _builtin_command(d: DeploymentShape, workers: int, fabric: FabricSpec, files: ModelFiles) -> list[str]:
    """Return `matrixstack engine serve ...` for deployment `d` listening on all addresses at ENGINE_PORT."""
    args = d.engine_args
    command = ["matrixstack", "engine", "serve", d.arch, "--workers", str(workers)]
    command += ["--host", "0.0.0.0", "--port", str(ENGINE_PORT), "--model-id", d.name]
    if d.weights == WEIGHTS_RANDOM:
        command.append("--random-weights")
    elif files.path is not None:
        command += ["--weights", files.path]
    device = "cpu" if device_resource(fabric) == "cpu" else "cuda" if fabric.device.vendor == "NVIDIA" else "auto"
    command += ["--device", device, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    command += ["--num-kv-blocks", str(args.num_kv_blocks), "--block-size", str(args.block_size)]
    return command + ([] if args.max_num_seqs is None else ["--max-num-seqs", str(args.max_num_seqs)])


def _vllm_command(
    d: DeploymentShape, instance: InstancePlan, fabric: FabricSpec, pods: int, head: str, files: ModelFiles
) -> list[str]:
    """Return the container command of a vLLM deployment's pods (a shell line choosing by ordinal when pods > 1)."""
    from matrixstack.lanes.vllm import VllmLauncher

    dies = fabric.device.dies_per_device
    assert files.path is not None  # model_files gives every vLLM deployment a folder
    launcher = VllmLauncher.from_plan(
        files.path,
        instance,
        port=ENGINE_PORT,
        extra_args=vllm_flags(d.engine_args, instance, dies),
        dies_per_device=dies,
        host="0.0.0.0",
        served_model_name=d.name,
    )
    command = launcher.serve_command()
    if pods == 1:
        return command
    dp = instance.dp(dies)
    if instance.pp > 1 or dp % pods:
        raise UserError(
            f"deployment {d.name}: vLLM spreads data-parallel ranks evenly over the {pods} nodes its slice spans, "
            f"but the plan has dp={dp}, pp={instance.pp}; plan with pp=1 and dp a multiple of {pods}"
        )
    local_dp = dp // pods
    multi = f"--data-parallel-size-local {local_dp} --data-parallel-address {head} --data-parallel-rpc-port "
    multi += str(VLLM_RPC_PORT)
    line = " ".join(command)
    script = (
        'ordinal="${HOSTNAME##*-}"; '
        f'if [ "$ordinal" = 0 ]; then exec {line} {multi}; '
        f'else exec {line} {multi} --headless --data-parallel-start-rank "$((ordinal * {local_dp}))"; fi'
    )
    return ["sh", "-c", script]
