"""The k8s site: `render_k8s` and `matrixstack stack render k8s`, checked against Volcano's HyperNode CRD schema
and the `kubernetes` client's models (strictly: unknown keys, missing required fields and wrong types fail)."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client
import pytest
import yaml

from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.portal.deployment_service import engine_secret
from matrixstack.stack.k8s import render_k8s
from matrixstack.stack.k8s_topology import NODE_LABEL
from matrixstack.stack.spec import load_shape, parse_shape

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPE = REPO / "src" / "matrixstack" / "stack" / "shapes" / "default.yaml"
# the HyperNode CRD schema: a copy of ../shared/data/k8s's, so every checkout validates (test below keeps them equal)
HYPERNODE_CRD = REPO / "tests" / "data" / "k8s" / "topology.volcano.sh_hypernodes.yaml"
SHARED_HYPERNODE_CRD = REPO.parent / "shared" / "data" / "k8s" / "topology.volcano.sh_hypernodes.yaml"
EXAMPLE_SHAPES = sorted((REPO / "examples" / "shapes").rglob("*.yaml"))

# A CloudMatrix384 shape: a first-party tiny-moe on 4 NPUs (8 dies), a vLLM deployment over two nodes that may
# leave the scale-up domain, one held at tier L1, and DeepSeek-R1 as a third-party upstream whose key is a secret.
CM384_SHAPE = {
    "name": "cm384-k8s",
    "fabric": "cloudmatrix384",
    "pools": [{"name": "supernode"}],
    "deployments": [
        {
            "name": "tiny-moe",
            "arch": "tiny-moe",
            "pool": "supernode",
            "slice": {"dies": 8},
            "workload": {"input_len": 256, "output_len": 128},
            "slo": {"tpot_ms": 100},
        },
        {
            "name": "tiny-moe-node",
            "arch": "tiny-moe",
            "pool": "supernode",
            "slice": {"devices": 2, "host_cpus": 1, "dram_gib": 64, "constraints": {"max_tier": "L1"}},
            "workload": {"input_len": 256, "output_len": 128},
            "slo": {"tpot_ms": 100},
        },
        {
            "name": "tiny-moe-vllm",
            "arch": "tiny-moe",
            "engine": "vllm",
            "weights": "/models/tiny-moe",
            "pool": "supernode",
            "slice": {"devices": 24, "constraints": {"within_domain": False}},
            "plan": {
                "prefill": {"devices": 1, "ep": 2, "batch_per_device": 4096},
                "decode": {"devices": 16, "ep": 32, "batch_per_device": 64},
            },
            "workload": {"input_len": 256, "output_len": 128},
        },
    ],
    "catalog": [
        {
            "name": "tiny-moe",
            "level": "L0",
            "provider": "first-party",
            "backend": {"kind": "engine", "deployment": "tiny-moe"},
        },
        {
            "name": "tiny-moe-support",
            "level": "L1",
            "parent": "tiny-moe",
            "system_prompt": "You answer support questions.",
        },
        {
            "name": "deepseek-r1",
            "level": "L0",
            "provider": "third-party",
            "backend": {
                "kind": "upstream",
                "url": "https://api.deepseek.example/v1",
                "model": "deepseek-reasoner",
                "api_key_env": "DEEPSEEK_API_KEY",
            },
        },
    ],
    "site": {"kind": "k8s", "name": "region-1", "namespace": "ms-cm384", "image": "registry.example/matrixstack:1"},
}

CORE_MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("apps/v1", "Deployment"): "V1Deployment",
}
PRIMITIVES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "datetime": (str,), "bytes": (str,)}


def model_errors(data: Any, type_name: str, path: str = "") -> list[str]:
    """Return what is wrong with `data` as the kubernetes client's type `type_name` (e.g. 'V1StatefulSet',
    'List[V1Container]', 'Dict[str, str]'): keys the model does not know, required fields missing, wrong types."""
    if match := re.fullmatch(r"List\[(.+)\]", type_name):
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in model_errors(item, match.group(1), f"{path}[{i}]")]
    if match := re.fullmatch(r"Dict\[str, (.+)\]", type_name):
        if not isinstance(data, dict):
            return [f"{path}: expected a mapping, got {type(data).__name__}"]
        return [e for k, v in data.items() for e in model_errors(v, match.group(1), f"{path}.{k}")]
    if type_name == "object":  # int-or-string and free-form fields
        return []
    if type_name in PRIMITIVES:
        kinds = PRIMITIVES[type_name]
        if isinstance(data, bool) and bool not in kinds or not isinstance(data, kinds):
            return [f"{path}: expected {type_name}, got {type(data).__name__} {data!r}"]
        return []
    model = getattr(kubernetes.client, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} mapping, got {type(data).__name__}"]
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    # the client's models are pydantic: a field's alias (e.g. `_exec` for `var_exec`) is its attribute_map name
    required = {model.attribute_map[f.alias or name] for name, f in model.model_fields.items() if f.is_required()}
    errors = [f"{path}.{key}: not a field of {type_name}" for key in data if key not in by_key]
    errors += [f"{path}.{key}: required by {type_name}, missing" for key in sorted(required - data.keys())]
    for key, value in data.items():
        if key in by_key:
            errors += model_errors(value, model.openapi_types[by_key[key]], f"{path}.{key}")
    return errors


def core_errors(obj: dict[str, Any]) -> list[str]:
    """Return the errors of one core object against the kubernetes client's model of its apiVersion and kind."""
    return model_errors(obj, CORE_MODELS[obj["apiVersion"], obj["kind"]], obj["kind"])


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of an openAPIV3Schema in which every object with declared properties forbids other keys, as
    the API server's pruning would silently drop them (a misspelt key must fail here instead)."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@pytest.fixture(scope="module")
def hypernode_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(HYPERNODE_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def test_the_crd_copy_is_the_shared_one():
    if not SHARED_HYPERNODE_CRD.is_file():
        pytest.skip(f"no {SHARED_HYPERNODE_CRD} beside this checkout to compare the copy with")
    assert HYPERNODE_CRD.read_bytes() == SHARED_HYPERNODE_CRD.read_bytes()


def load_dir(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Return {file name: objects} of a rendered folder."""
    return {p.name: [o for o in yaml.safe_load_all(p.read_text()) if o] for p in sorted(out.glob("*.yaml"))}


def of_kind(files: dict[str, list[dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [o for objects in files.values() for o in objects if o["kind"] == kind]


@pytest.fixture(scope="module")
def default_render(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("default")
    written = render_k8s(load_shape(DEFAULT_SHAPE), out)
    assert [p.name for p in written] == sorted(p.name for p in out.iterdir())
    return load_dir(out)


@pytest.fixture(scope="module")
def cm384_render(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("cm384")
    render_k8s(parse_shape(copy.deepcopy(CM384_SHAPE), "test"), out)
    return load_dir(out)


@pytest.fixture(scope="module", params=["default", "cm384"])
def rendered(request) -> dict[str, list[dict[str, Any]]]:
    return request.getfixturevalue(f"{request.param}_render")


def test_layout_and_apply_order(default_render, cm384_render):
    assert list(default_render) == [
        "00-namespace.yaml",
        "01-hypernodes.yaml",
        "02-portal.yaml",
        "10-deployment-tiny-moe.yaml",
    ]
    assert [o["kind"] for o in cm384_render["10-deployment-tiny-moe-vllm.yaml"]] == [
        "PodGroup",
        "Service",
        "StatefulSet",
    ]
    assert [o["kind"] for o in cm384_render["02-portal.yaml"]] == ["ConfigMap", "Deployment", "Service"]


def test_every_hypernode_validates_against_the_crd(rendered, hypernode_validator):
    nodes = of_kind(rendered, "HyperNode")
    assert nodes
    for node in nodes:
        errors = [e.message for e in hypernode_validator.iter_errors(node)]
        assert not errors, (node["metadata"]["name"], errors)
        for member in node["spec"]["members"]:  # the CRD's CEL rule: exactly one selector kind
            assert len(member["selector"]) == 1, member


def test_crd_schema_check_rejects_a_misspelt_hypernode(cm384_render, hypernode_validator):
    node = copy.deepcopy(of_kind(cm384_render, "HyperNode")[0])
    node["spec"]["tierNmae"] = node["spec"].pop("tierName")
    assert any("tierNmae" in e.message for e in hypernode_validator.iter_errors(node))
    node = copy.deepcopy(of_kind(cm384_render, "HyperNode")[0])
    node["spec"]["members"][0]["type"] = "Rack"
    assert list(hypernode_validator.iter_errors(node))


def test_cloudmatrix384_hypernode_tree_follows_the_fabric(cm384_render):
    fabric = load_fabric("cloudmatrix384")
    (plane,) = [p for p in fabric.planes if p.kind == "scale_up"]
    assert [t.nodes_per_domain for t in plane.tiers] == [1, 48] and fabric.node_count == 48
    nodes = of_kind(cm384_render, "HyperNode")
    tier1 = [n for n in nodes if n["spec"]["tier"] == 1]
    tier2 = [n for n in nodes if n["spec"]["tier"] == 2]
    assert len(nodes) == len(tier1) + len(tier2)
    assert len(tier1) == fabric.node_count // plane.tiers[0].nodes_per_domain == 48
    assert {n["spec"]["tierName"] for n in tier1} == {plane.tiers[0].name}
    labels = []
    for n in tier1:
        (member,) = n["spec"]["members"]
        assert member["type"] == "Node"
        labels.append(member["selector"]["labelMatch"]["matchLabels"][NODE_LABEL])
    assert sorted(labels) == sorted(f"supernode-0-{i}" for i in range(48))
    (top,) = tier2
    assert top["spec"]["tierName"] == plane.tiers[1].name
    children = [m["selector"]["exactMatch"]["name"] for m in top["spec"]["members"]]
    assert all(m["type"] == "HyperNode" for m in top["spec"]["members"])
    assert sorted(children) == sorted(n["metadata"]["name"] for n in tier1)


def test_one_node_scale_up_domain_takes_the_scale_out_tiers(tmp_path, hypernode_validator):
    shape = parse_shape({"name": "dgx", "fabric": "dgx-h100", "pools": [{"name": "gpu", "fabrics": 2}]}, "test")
    render_k8s(shape, tmp_path)
    nodes = of_kind(load_dir(tmp_path), "HyperNode")
    for node in nodes:
        assert not list(hypernode_validator.iter_errors(node))
    per_tier = {t: sorted(n["metadata"]["name"] for n in nodes if n["spec"]["tier"] == t) for t in (1, 2, 3)}
    # two copies of 32 nodes: nvswitch (1 node), leaf (16 nodes over InfiniBand), spine (32)
    assert [len(per_tier[t]) for t in (1, 2, 3)] == [64, 4, 2]
    assert {n["spec"]["tierName"] for n in nodes} == {"nvswitch", "leaf", "spine"}
    (spine,) = [n for n in nodes if n["metadata"]["name"] == "gpu-1-t3-0"]
    assert [m["selector"]["exactMatch"]["name"] for m in spine["spec"]["members"]] == ["gpu-1-t2-0", "gpu-1-t2-1"]


def test_every_core_object_matches_the_kubernetes_models(rendered):
    core = [o for objects in rendered.values() for o in objects if (o["apiVersion"], o["kind"]) in CORE_MODELS]
    assert {o["kind"] for o in core} == {"Namespace", "Service", "ConfigMap", "StatefulSet", "Deployment"}
    for obj in core:
        assert core_errors(obj) == [], obj["metadata"]["name"]


def test_model_check_fails_on_a_misspelt_key_a_missing_field_and_a_wrong_type(default_render):
    (sts,) = of_kind(default_render, "StatefulSet")
    bad = copy.deepcopy(sts)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert core_errors(bad) == [
        "StatefulSet.spec.template.spec.containers[0].imagePullPolicyy: not a field of V1Container"
    ]
    bad = copy.deepcopy(sts)
    del bad["spec"]["template"]["spec"]["containers"][0]["name"]
    assert core_errors(bad) == ["StatefulSet.spec.template.spec.containers[0].name: required by V1Container, missing"]
    bad = copy.deepcopy(sts)
    bad["spec"]["replicas"] = "1"
    assert core_errors(bad) == ["StatefulSet.spec.replicas: expected int, got str '1'"]


def test_podgroups_gang_and_network_topology(rendered):
    groups = {g["metadata"]["name"]: g for g in of_kind(rendered, "PodGroup")}
    sets = of_kind(rendered, "StatefulSet")
    assert sorted(groups) == sorted(s["metadata"]["name"] for s in sets)
    tiers = {n["spec"]["tier"] for n in of_kind(rendered, "HyperNode")}
    for sts in sets:
        group = groups[sts["metadata"]["name"]]
        assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
        assert set(group["spec"]) == {"minMember", "networkTopology"}
        assert type(group["spec"]["minMember"]) is int and group["spec"]["minMember"] == sts["spec"]["replicas"] >= 1
        topology = group["spec"]["networkTopology"]
        assert set(topology) == {"mode", "highestTierAllowed"} and topology["mode"] in ("hard", "soft")
        assert type(topology["highestTierAllowed"]) is int and topology["highestTierAllowed"] in tiers
        pod = sts["spec"]["template"]
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == group["metadata"]["name"]
        assert pod["spec"]["schedulerName"] == "volcano"


def test_cm384_topology_and_devices(cm384_render):
    groups = {g["metadata"]["name"]: g["spec"] for g in of_kind(cm384_render, "PodGroup")}
    # within the scale-up domain (default): hard at L2 (tier 2); max_tier L1: hard at 1; may leave it: soft
    assert groups["tiny-moe"]["networkTopology"] == {"mode": "hard", "highestTierAllowed": 2}
    assert groups["tiny-moe-node"]["networkTopology"] == {"mode": "hard", "highestTierAllowed": 1}
    assert groups["tiny-moe-vllm"]["networkTopology"] == {"mode": "soft", "highestTierAllowed": 2}
    assert groups["tiny-moe-vllm"]["minMember"] == 2  # its decode instance of 16 NPUs spans two 8-NPU nodes
    containers = {
        s["metadata"]["name"]: s["spec"]["template"]["spec"]["containers"][0]
        for s in of_kind(cm384_render, "StatefulSet")
    }
    assert containers["tiny-moe"]["resources"]["requests"] == {"huawei.com/Ascend910": "4"}
    # one Kunpeng socket = 64 cores, and the pooled DRAM
    assert containers["tiny-moe-node"]["resources"]["limits"] == {
        "huawei.com/Ascend910": "2",
        "cpu": "64",
        "memory": "64Gi",
    }
    assert containers["tiny-moe-vllm"]["resources"]["requests"] == {"huawei.com/Ascend910": "8"}
    command = containers["tiny-moe"]["command"]
    assert command[:4] == ["matrixstack", "engine", "serve", "tiny-moe"]
    assert command[command.index("--workers") + 1] == "2" and command[command.index("--model-id") + 1] == "tiny-moe"
    script = containers["tiny-moe-vllm"]["command"][2]
    assert "vllm serve /models/tiny-moe" in script and "--data-parallel-size 32" in script
    assert "--data-parallel-size-local 16" in script and "--headless" in script


def test_default_shape_requests_cpu_cores(default_render):
    (sts,) = of_kind(default_render, "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "2"}  # the local fabric's devices are CPU cores
    assert container["command"][container["command"].index("--workers") + 1] == "2"  # decode.ep pinned to 2


def test_portal_mounts_the_shape_and_references_secrets(cm384_render):
    (config,) = of_kind(cm384_render, "ConfigMap")
    shape = parse_shape(yaml.safe_load(config["data"]["shape.yaml"]), "config map")
    assert shape == parse_shape(copy.deepcopy(CM384_SHAPE), "test")
    endpoints = yaml.safe_load(config["data"]["endpoints.yaml"])
    assert endpoints["tiny-moe"]["url"] == "http://tiny-moe-0.tiny-moe.ms-cm384.svc:8000/v1"
    (portal,) = of_kind(cm384_render, "Deployment")
    pod = portal["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    (container,) = pod["containers"]
    assert any(m["name"] == volume["name"] for m in container["volumeMounts"])
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert secret_env == {
        "DEEPSEEK_API_KEY": {"name": "matrixstack-upstream", "key": "DEEPSEEK_API_KEY"},
        "MATRIXSTACK_SECRET_KEY": {"name": "matrixstack-data-key", "key": "MATRIXSTACK_SECRET_KEY"},  # derives
    }  # the engines' secrets, which the portal sends them
    assert not of_kind(cm384_render, "Secret")
    assert {o["metadata"].get("namespace") for o in of_kind(cm384_render, "Service")} == {"ms-cm384"}
    assert {
        c["image"] for s in of_kind(cm384_render, "StatefulSet") for c in s["spec"]["template"]["spec"]["containers"]
    } == {"registry.example/matrixstack:1"}


def test_every_engine_requires_its_secret_from_a_secret_object(cm384_render):
    engines = {s["metadata"]["name"]: s for s in of_kind(cm384_render, "StatefulSet")}
    assert len(engines) == 3
    for name, sts in engines.items():
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        is_vllm = "vllm" in " ".join(container["command"])
        variable = "VLLM_API_KEY" if is_vllm else "MATRIXSTACK_ENGINE_SECRET"
        (secret,) = [e for e in container["env"] if e["name"] == variable]
        assert secret == {"name": variable, "valueFrom": {"secretKeyRef": {"name": "matrixstack-engine", "key": name}}}
        assert all("value" not in e for e in container["env"] if e["name"] == variable)  # a reference, no literal


def test_deployment_secret_prints_what_the_portal_derives_under_the_same_key(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path))
    monkeypatch.setenv("MATRIXSTACK_SECRET_KEY", base64.urlsafe_b64encode(bytes(range(32))).decode())
    shown = cli("deployment", "secret", "tiny-moe")
    assert shown.exit_code == 0 and shown.output.strip() == engine_secret("tiny-moe")
    assert cli("deployment", "secret", "tiny-moe-vllm").output.strip() != engine_secret("tiny-moe")
    monkeypatch.setenv("MATRIXSTACK_SECRET_KEY", base64.urlsafe_b64encode(bytes(32)).decode())
    assert cli("deployment", "secret", "tiny-moe").output.strip() != shown.output.strip()  # another portal's key
    assert not list(tmp_path.iterdir())  # the key came from the environment: nothing written


def test_builtin_engine_over_two_nodes_is_refused(tmp_path):
    data = copy.deepcopy(CM384_SHAPE)
    data["deployments"][0]["slice"] = {"devices": 16}
    with pytest.raises(UserError, match="deployment tiny-moe: the builtin engine runs its workers on one node"):
        render_k8s(parse_shape(data, "test"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", EXAMPLE_SHAPES, ids=[str(p.relative_to(REPO)) for p in EXAMPLE_SHAPES])
def test_example_shapes_render_and_validate(path, tmp_path, hypernode_validator):
    render_k8s(load_shape(path), tmp_path)
    for objects in load_dir(tmp_path).values():
        for obj in objects:
            if obj["kind"] == "HyperNode":
                assert not list(hypernode_validator.iter_errors(obj))
            elif (obj["apiVersion"], obj["kind"]) in CORE_MODELS:
                assert core_errors(obj) == []


def test_cli_renders_refuses_to_overwrite_and_replaces(cli, tmp_path):
    shape_path = tmp_path / "cm384.yaml"
    shape_path.write_text(yaml.safe_dump(CM384_SHAPE))
    out = tmp_path / "manifests" / "cm384"
    result = cli("stack", "render", "k8s", str(shape_path), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "HyperNode: 49" in result.output and "PodGroup: 3" in result.output
    assert "create secret generic matrixstack-upstream --from-literal=DEEPSEEK_API_KEY=" in result.output
    assert "create secret generic matrixstack-data-key --from-literal=MATRIXSTACK_SECRET_KEY=" in result.output
    assert '--from-literal=tiny-moe="$(matrixstack deployment secret tiny-moe)"' in result.output
    assert len(list(out.glob("10-deployment-*.yaml"))) == 3
    again = cli("stack", "render", "k8s", str(shape_path), "--out", str(out))
    assert again.exit_code == 2 and "--replace" in again.output
    smaller = copy.deepcopy(CM384_SHAPE)
    smaller["deployments"] = smaller["deployments"][:1]
    shape_path.write_text(yaml.safe_dump(smaller))
    replaced = cli("stack", "render", "k8s", str(shape_path), "--out", str(out), "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert [p.name for p in out.glob("10-deployment-*.yaml")] == ["10-deployment-tiny-moe.yaml"]


def test_cli_bad_shape_exits_2(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "fabric": "cloudmatrix384", "deployments": [{"name": "x"}]}))
    result = cli("stack", "render", "k8s", str(bad), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "deployments" in result.output and "arch" in result.output
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"name": "u", "fabric": "no-such-fabric"}))
    result = cli("stack", "render", "k8s", str(unknown), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no-such-fabric" in result.output
    assert not (tmp_path / "out").exists()


# ---- engine settings and model files ----------------------------------------------------------------------------

MIXED_LANES = REPO / "examples" / "shapes" / "mixed-lanes.yaml"
ON_CPU = {"precision": "fp32"}  # the local fabric's cores have no int8 peak for perf to plan with


def pod_spec(files: dict[str, list[dict[str, Any]]], deployment: str) -> dict[str, Any]:
    """Return the pod template spec of a deployment's StatefulSet."""
    (sts,) = [s for s in of_kind(files, "StatefulSet") if s["metadata"]["name"] == deployment]
    return sts["spec"]["template"]["spec"]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_vllm_pods_take_the_engine_args_and_the_cpu_settings(tmp_path):
    shape = load_shape(MIXED_LANES)
    render_k8s(shape, tmp_path)
    files = load_dir(tmp_path)
    vllm = pod_spec(files, "tiny-moe-vllm")
    (container,) = vllm["containers"]
    command = container["command"]
    assert command[:2] == ["vllm", "serve"]
    args = shape.deployment("tiny-moe-vllm").engine_args
    assert (args.dtype, args.max_model_len, args.max_num_seqs) == ("float32", 2048, None)  # the shape's, not defaults
    assert flag(command, "--dtype") == "float32" and flag(command, "--max-model-len") == "2048"
    # no max_num_seqs in engine_args: the plan's decode batch, 16 per device on one device and one dp rank
    assert flag(command, "--max-num-seqs") == "16" and flag(command, "--tensor-parallel-size") == "1"
    assert "--data-parallel-size" not in command and "--enable-expert-parallel" not in command  # the plan's EP1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VLLM_API_KEY"] is None  # from the engines' Secret (test_every_engine_requires_its_secret_...)
    # tiny-moe's KV of 1024 blocks x 16 tokens in float32 is far below a GiB: vLLM's smallest setting, 1 GiB
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    # the packaged weights, exported by an init container into the pod's emptyDir, are where vLLM looks
    (setup,) = vllm["initContainers"]
    model = command[2]
    assert setup["command"] == ["matrixstack", "model", "export", "tiny-moe", "--format", "hf", "--out", model]
    (volume,) = vllm["volumes"]
    assert volume == {"name": "data", "emptyDir": {}}
    (mount,) = container["volumeMounts"]
    assert mount["readOnly"] is True and model.startswith(mount["mountPath"] + "/")
    assert [m["mountPath"] for m in setup["volumeMounts"]] == [mount["mountPath"]]
    assert "readOnly" not in setup["volumeMounts"][0]
    # the builtin engine's pod: the same engine_args as its own options, the image's packaged weights, no setup
    engine = pod_spec(files, "tiny-moe-engine")
    (container,) = engine["containers"]
    command = container["command"]
    assert command[:4] == ["matrixstack", "engine", "serve", "tiny-moe"] and "--weights" not in command
    assert flag(command, "--dtype") == "float32" and flag(command, "--max-num-seqs") == "16"
    assert "initContainers" not in engine and "volumes" not in engine
    assert [e["name"] for e in container["env"]] == ["MATRIXSTACK_ENGINE_SECRET"]  # its secret, nothing else


def test_vllm_on_npus_mounts_its_weights_folder_and_gets_no_cpu_settings(cm384_render):
    pod = pod_spec(cm384_render, "tiny-moe-vllm")
    (container,) = pod["containers"]
    assert pod["volumes"] == [{"name": "model-0", "hostPath": {"path": "/models/tiny-moe", "type": "Directory"}}]
    assert container["volumeMounts"] == [{"name": "model-0", "mountPath": "/models/tiny-moe", "readOnly": True}]
    script = container["command"][2]
    assert "vllm serve /models/tiny-moe " in script
    # the decode plan's 64 sequences per device x 16 devices over its 32 dp ranks (2 dies each); defaults otherwise
    assert "--max-num-seqs 32 --max-model-len 2048 --dtype float32" in script
    assert [e["name"] for e in container["env"]] == ["VLLM_API_KEY"] and "initContainers" not in pod


@pytest.fixture
def registered_tiny_moe(tmp_path, monkeypatch, cli) -> Path:
    """Return a Hugging Face folder of tiny-moe registered as the model `tm-hf` in a data dir of this test."""
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    folder = tmp_path / "hf" / "tiny-moe"
    assert cli("model", "export", "tiny-moe", "--format", "hf", "--out", str(folder)).exit_code == 0
    added = cli("model", "add", str(folder), "--name", "tm-hf")
    assert added.exit_code == 0, added.output
    return folder


def test_a_registered_model_is_mounted_from_its_folder_on_both_lanes(registered_tiny_moe, tmp_path):
    folder = str(registered_tiny_moe.resolve())
    deployments = [
        {
            "name": "on-engine",
            "arch": "tm-hf",
            "slice": {"devices": 1},
            "workload": ON_CPU,
            "engine_args": {"dtype": "bfloat16"},
        },
        {
            "name": "on-vllm",
            "arch": "tm-hf",
            "engine": "vllm",
            "slice": {"devices": 1},
            "plan": {"devices": 1, "ep": 1, "batch_per_device": 8},
            "workload": ON_CPU,
        },
    ]
    shape = parse_shape({"name": "registered", "fabric": "local", "deployments": deployments}, "test")
    render_k8s(shape, tmp_path / "out")
    files = load_dir(tmp_path / "out")
    for obj in [o for objects in files.values() for o in objects if (o["apiVersion"], o["kind"]) in CORE_MODELS]:
        assert core_errors(obj) == [], obj["metadata"]["name"]
    host = {"name": "model-0", "hostPath": {"path": folder, "type": "Directory"}}
    read_only = {"name": "model-0", "mountPath": folder, "readOnly": True}
    vllm = pod_spec(files, "on-vllm")
    (container,) = vllm["containers"]
    assert container["command"][2] == folder and flag(container["command"], "--dtype") == "float32"
    assert vllm["volumes"] == [host] and container["volumeMounts"] == [read_only]
    assert "initContainers" not in vllm
    # the builtin engine finds the arch in the registry: an init container registers the folder again in the pod
    engine = pod_spec(files, "on-engine")
    (container,) = engine["containers"]
    assert container["command"][:4] == ["matrixstack", "engine", "serve", "tm-hf"]
    assert "--weights" not in container["command"] and flag(container["command"], "--dtype") == "bfloat16"
    (setup,) = engine["initContainers"]
    assert setup["command"] == ["matrixstack", "model", "add", folder, "--name", "tm-hf"]
    data = {e["value"] for e in setup["env"] if e["name"] == "MATRIXSTACK_HOME"}
    assert data == {e["value"] for e in container["env"] if e["name"] == "MATRIXSTACK_HOME"} and len(data) == 1
    assert engine["volumes"] == [host, {"name": "data", "emptyDir": {}}]
    assert read_only in setup["volumeMounts"] and read_only in container["volumeMounts"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {folder, *data}


def test_a_weights_folder_is_mounted_where_the_builtin_engine_reads_it(tmp_path):
    deployment = {"name": "tm", "arch": "tiny-moe", "weights": "/srv/models/tm", "slice": {"devices": 1}}
    deployment["workload"] = ON_CPU
    render_k8s(parse_shape({"name": "w", "fabric": "local", "deployments": [deployment]}, "test"), tmp_path)
    pod = pod_spec(load_dir(tmp_path), "tm")
    (container,) = pod["containers"]
    assert flag(container["command"], "--weights") == "/srv/models/tm"
    assert pod["volumes"] == [{"name": "model-0", "hostPath": {"path": "/srv/models/tm", "type": "Directory"}}]
    assert container["volumeMounts"] == [{"name": "model-0", "mountPath": "/srv/models/tm", "readOnly": True}]


def test_vllm_with_random_weights_is_refused(tmp_path):
    deployment = {"name": "tm", "arch": "tiny-moe", "weights": "random", "engine": "vllm", "slice": {"devices": 1}}
    deployment |= {"workload": ON_CPU, "plan": {"devices": 1, "ep": 1, "batch_per_device": 8}}
    shape = parse_shape({"name": "r", "fabric": "local", "deployments": [deployment]}, "test")
    with pytest.raises(UserError, match="deployment tm: weights: random is for the builtin engine"):
        render_k8s(shape, tmp_path / "out")


def test_a_models_claim_mounts_the_model_store_instead_of_node_folders(tmp_path):
    data = copy.deepcopy(CM384_SHAPE)
    data["site"]["models_claim"] = "model-store"
    render_k8s(parse_shape(data, "test"), tmp_path)
    files = load_dir(tmp_path)
    for obj in [o for objects in files.values() for o in objects if (o["apiVersion"], o["kind"]) in CORE_MODELS]:
        assert core_errors(obj) == [], obj["metadata"]["name"]
    pod = pod_spec(files, "tiny-moe-vllm")
    (container,) = pod["containers"]
    assert pod["volumes"] == [
        {"name": "models", "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True}}
    ]
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/models", "readOnly": True}]
    assert "vllm serve /models/tiny-moe " in container["command"][2]  # the folder's path inside the claim
    assert "volumes" not in pod_spec(files, "tiny-moe")  # the packaged weights need no model store

    data["deployments"][2]["weights"] = "/srv/tiny-moe"
    with pytest.raises(UserError, match=r"deployment tiny-moe-vllm: its model folder /srv/tiny-moe is not under"):
        render_k8s(parse_shape(data, "test"), tmp_path / "outside")
    data["site"]["models_claim"] = "Model_Store"
    with pytest.raises(UserError, match="models_claim"):
        parse_shape(data, "test")
