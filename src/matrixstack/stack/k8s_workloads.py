"""The Kubernetes objects of the `k8s` site's workloads: engines (PodGroup, Service, StatefulSet) and the portal
(ConfigMap, Deployment, Service). `stack.k8s` decides the layout (pods, devices, commands); this module spells it
out as manifests. See `stack.k8s` for the choices (StatefulSets, network topology, secrets).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from matrixstack.datakey import KEY_ENV
from matrixstack.engine.launch import ENGINE_SECRET_ENV
from matrixstack.fabric.spec import FabricSpec
from matrixstack.stack.k8s_topology import LABEL_PREFIX, dns_label
from matrixstack.stack.site import VLLM_API_KEY_ENV
from matrixstack.stack.spec import DeploymentShape, Shape

ENGINE_PORT = 8000
PORTAL_PORT = 8080
VLLM_RPC_PORT = 13345
PORTAL_NAME = "matrixstack-portal"
UPSTREAM_SECRET = "matrixstack-upstream"
DATA_KEY_SECRET = "matrixstack-data-key"  # the portal's data key (datakey.KEY_ENV): it derives engine secrets
ENGINE_SECRET = "matrixstack-engine"  # each engine's secret (`matrixstack deployment secret NAME`), key = its name
CONFIG_DIR = "/etc/matrixstack"
DATA_DIR = "/var/lib/matrixstack"
MODELS_DIR = "/models"  # where site.models_claim is mounted


@dataclass(frozen=True)
class ModelFiles:
    """Where an engine pod finds its model: the folder its command names, the node folders mounted read-only at
    their own paths (hostPath), and the command of an init container that writes the rest into the pod's data
    directory (an emptyDir at DATA_DIR, MATRIXSTACK_HOME of both containers)."""

    path: str | None  # the model folder the command names; None: the weights the image packages
    host_folders: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()  # the init container's command; empty: none


@dataclass(frozen=True)
class EngineLayout:
    """How one deployment runs on Kubernetes: its pods, each pod's devices, the ceiling tier, the command, its
    environment and its model files."""

    name: str  # DNS label of the deployment: StatefulSet, Service and PodGroup name
    pods: int
    devices_per_pod: int
    workers: int  # the plan's expert-parallel ranks
    mode: str  # Volcano networkTopology mode: hard or soft
    highest_tier: int  # 1-based tier number
    command: list[str]
    env: dict[str, str]
    files: ModelFiles


def labels_of(shape: Shape, component: str | None = None) -> dict[str, str]:
    """Return the labels every object of the shape carries (plus `app.kubernetes.io/name` for a component)."""
    labels = {"app.kubernetes.io/part-of": "matrixstack", LABEL_PREFIX + "shape": dns_label(shape.name)}
    if component:
        labels["app.kubernetes.io/name"] = component
    return labels


def _resources(d: DeploymentShape, layout: EngineLayout, fabric: FabricSpec, resource: str) -> dict[str, Any]:
    """Return one engine pod's resource requests and limits: its devices, host cores and pooled DRAM."""
    cores = math.ceil(d.slice.host_cpus * fabric.host.cores_per_cpu / layout.pods)
    amounts: dict[str, int] = {resource: layout.devices_per_pod}
    if cores:
        amounts["cpu"] = amounts.get("cpu", 0) + cores
    quantities = {k: str(v) for k, v in amounts.items()}
    if d.slice.dram_gib:
        quantities["memory"] = f"{math.ceil(d.slice.dram_gib / layout.pods)}Gi"
    return {"requests": quantities, "limits": dict(quantities)}


def engine_objects(
    shape: Shape, d: DeploymentShape, layout: EngineLayout, fabric: FabricSpec, resource: str
) -> list[dict[str, Any]]:
    """Return a deployment's PodGroup, headless Service and StatefulSet."""
    namespace = shape.site.namespace
    labels = labels_of(shape, "engine") | {LABEL_PREFIX + "deployment": layout.name}
    meta = {"name": layout.name, "namespace": namespace, "labels": labels}
    selector = {LABEL_PREFIX + "deployment": layout.name}
    pod_group = {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": meta,
        "spec": {
            "minMember": layout.pods,
            "networkTopology": {"mode": layout.mode, "highestTierAllowed": layout.highest_tier},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": ENGINE_PORT}],
        },
    }
    container = {
        "name": "engine",
        "image": shape.site.image,
        "command": layout.command,
        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        "resources": _resources(d, layout, fabric, resource),
        "readinessProbe": {"httpGet": {"path": "/health", "port": ENGINE_PORT}, "periodSeconds": 5},
    }
    if d.engine == "vllm" and layout.pods > 1:
        container["ports"].append({"name": "dp-rpc", "containerPort": VLLM_RPC_PORT})
        container.pop("readinessProbe")  # headless pods serve no HTTP; pod 0's readiness is the Service's
    pod: dict[str, Any] = {"schedulerName": "volcano", "containers": [container]}
    _add_model_files(pod, layout, shape.site.image, shape.site.models_claim)
    variable = VLLM_API_KEY_ENV if d.engine == "vllm" else ENGINE_SECRET_ENV
    secret = {"name": variable, "valueFrom": {"secretKeyRef": {"name": ENGINE_SECRET, "key": layout.name}}}
    container["env"] = [*container.get("env", []), secret]
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": layout.name,
            "replicas": layout.pods,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "scheduling.k8s.io/group-name": layout.name,
                        LABEL_PREFIX + "workers": str(layout.workers),
                    },
                },
                "spec": pod,
            },
        },
    }
    return [pod_group, service, stateful_set]


def _add_model_files(pod: dict[str, Any], layout: EngineLayout, image: str, claim: str | None) -> None:
    """Add an engine pod's environment, model volumes and mounts and its setup init container to `pod`: the node
    folders as hostPath volumes, or the claim `claim` at MODELS_DIR when given (`stack.k8s` checks that they lie
    under it)."""
    (container,) = pod["containers"]
    env = dict(layout.env)
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if claim and layout.files.host_folders:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    elif not claim:
        for i, folder in enumerate(layout.files.host_folders):
            volumes.append({"name": f"model-{i}", "hostPath": {"path": folder, "type": "Directory"}})
            mounts.append({"name": f"model-{i}", "mountPath": folder, "readOnly": True})
    if layout.files.setup:
        env["MATRIXSTACK_HOME"] = DATA_DIR
        volumes.append({"name": "data", "emptyDir": {}})
        data = {"name": "data", "mountPath": DATA_DIR}
        pod["initContainers"] = [
            {
                "name": "setup",
                "image": image,
                "command": list(layout.files.setup),
                "env": [{"name": "MATRIXSTACK_HOME", "value": DATA_DIR}],
                "volumeMounts": [*mounts, data],
            }
        ]
        mounts.append(data | {"readOnly": True})
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if volumes:
        container["volumeMounts"] = mounts
        pod["volumes"] = volumes


def _endpoints(shape: Shape, layouts: list[EngineLayout]) -> dict[str, dict[str, str]]:
    """Return {deployment: {kind, url}}: the in-cluster OpenAI base URL of each deployment's pod 0."""
    namespace = shape.site.namespace
    return {
        d.name: {
            "kind": "engine" if d.engine == "matrixstack" else "vllm",
            "url": f"http://{layout.name}-0.{layout.name}.{namespace}.svc:{ENGINE_PORT}/v1",
        }
        for d, layout in zip(shape.deployments, layouts, strict=True)
    }


def portal_objects(shape: Shape, layouts: list[EngineLayout]) -> list[dict[str, Any]]:
    """Return the portal's ConfigMap (shape and endpoints), Deployment and Service."""
    namespace = shape.site.namespace
    labels = labels_of(shape, "portal")
    meta = {"name": PORTAL_NAME, "namespace": namespace, "labels": labels}
    port = shape.site.portal_port or PORTAL_PORT
    endpoints = _endpoints(shape, layouts)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {
            "shape.yaml": yaml.safe_dump(shape.dump(), sort_keys=False, width=120),
            "endpoints.yaml": yaml.safe_dump(endpoints, sort_keys=False, width=120),
        },
    }
    steps = [shlex.join(["matrixstack", "shape", "import", f"{CONFIG_DIR}/shape.yaml"])]
    steps += [
        shlex.join(["matrixstack", "deployment", "add", name, "--kind", e["kind"], "--url", e["url"]])
        for name, e in endpoints.items()
    ]
    secrets = sorted({e.backend.api_key_env for e in shape.catalog if e.backend and e.backend.api_key_env})
    env = [{"name": "MATRIXSTACK_HOME", "value": DATA_DIR}]
    env += [{"name": v, "valueFrom": {"secretKeyRef": {"name": UPSTREAM_SECRET, "key": v}}} for v in secrets]
    env += [{"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": DATA_KEY_SECRET, "key": KEY_ENV}}}]
    volumes = [
        {"name": "shape", "configMap": {"name": PORTAL_NAME}},
        {"name": "data", "emptyDir": {}},
    ]
    mounts = [{"name": "shape", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "data", "mountPath": DATA_DIR}]
    setup = {
        "name": "import-shape",
        "image": shape.site.image,
        "command": ["sh", "-c", " && ".join(steps)],
        "env": env,
        "volumeMounts": mounts,
    }
    portal = {
        "name": "portal",
        "image": shape.site.image,
        "command": ["matrixstack", "portal", "serve", "--host", "0.0.0.0", "--port", str(port)],
        "ports": [{"name": "http", "containerPort": port}],
        "env": env,
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 5},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"initContainers": [setup], "containers": [portal], "volumes": volumes},
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": labels,
            "ports": [{"name": "http", "port": port, "targetPort": port}],
        },
    }
    return [config_map, deployment, service]
