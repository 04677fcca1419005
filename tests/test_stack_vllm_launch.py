"""A vLLM deployment's launch, without starting vLLM: its flags from the plan (tp, dp, ep, dies per device) and
engine_args, its environment on CPU (thread binding, KV space) and CUDA slices, the core binding that runs before
the server, and where its model folder comes from (a given folder, a registered model, packaged weights exported
once per package content), with `weights: random` and a folder that is no Hugging Face folder refused.
(The real server on the local site: tests/test_stack_local_vllm.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from matrixstack.arch.registry import read_folder, register_model
from matrixstack.engine import PACKAGED_WEIGHTS
from matrixstack.errors import UserError
from matrixstack.perf.spec import InstancePlan
from matrixstack.stack import vllm_launch
from matrixstack.stack.site import Launch
from matrixstack.stack.spec import EngineArgs
from matrixstack.stack.vllm_launch import (
    PIN_AND_EXEC,
    check_vllm_model,
    kv_cache_gib,
    thread_binding,
    vllm_command,
    vllm_env,
    vllm_launcher,
    vllm_model_folder,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def launch(**fields) -> Launch:
    values = dict(
        name="lane",
        arch="tiny-moe",
        weights="packaged",
        engine="vllm",
        workers=1,
        device_kind="cpu",
        devices=(0, 1),
        strategy="STRICT_PACK",
        engine_args=EngineArgs(max_model_len=1024, max_num_seqs=16, dtype="bfloat16"),
    )
    return Launch(**(values | fields))


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_flags_come_from_the_plan_and_engine_args(hf_folder, tmp_path):
    plan = InstancePlan(devices=4, tp=2, ep=4, batch_per_device=8)
    given = launch(weights=str(hf_folder), devices=tuple(range(8)), plan=plan)
    argv = vllm_launcher(given, 8200, "127.0.0.1", tmp_path / "lane.log").command()
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and flag(argv, "--model") == str(hf_folder)
    assert (flag(argv, "--tensor-parallel-size"), flag(argv, "--data-parallel-size")) == ("2", "2")
    assert "--enable-expert-parallel" in argv and flag(argv, "--pipeline-parallel-size") is None
    assert (flag(argv, "--host"), flag(argv, "--port"), flag(argv, "--served-model-name")) == (
        "127.0.0.1",
        "8200",
        "lane",
    )
    assert (flag(argv, "--max-num-seqs"), flag(argv, "--max-model-len"), flag(argv, "--dtype")) == (
        "16",
        "1024",
        "bfloat16",
    )


def test_max_num_seqs_is_the_plans_decode_batch_per_dp_rank_unless_engine_args_give_one(hf_folder, tmp_path):
    # 8 sequences per device x 4 devices, over dp = 4 ranks / tp 2 = 2 engine cores: 16 each
    plan = InstancePlan(devices=4, tp=2, ep=4, batch_per_device=8)
    open_args = EngineArgs(max_model_len=1024, dtype="bfloat16")
    assert open_args.max_num_seqs is None
    given = launch(weights=str(hf_folder), devices=tuple(range(8)), plan=plan, engine_args=open_args)
    assert flag(vllm_launcher(given, 8200, "127.0.0.1", tmp_path / "l.log").command(), "--max-num-seqs") == "16"
    # a fractional batch rounds up, and never below one sequence
    thin = launch(
        weights=str(hf_folder), plan=InstancePlan(devices=1, ep=1, batch_per_device=0.3), engine_args=open_args
    )
    assert flag(vllm_launcher(thin, 8200, "127.0.0.1", tmp_path / "l.log").command(), "--max-num-seqs") == "1"


def test_dies_per_device_count_as_ranks_and_an_ep_vllm_cannot_run_is_refused(hf_folder, tmp_path):
    two_dies = launch(weights=str(hf_folder), plan=InstancePlan(devices=2, ep=4, batch_per_device=8), dies_per_device=2)
    argv = vllm_launcher(two_dies, 8200, "127.0.0.1", tmp_path / "lane.log").command()
    assert flag(argv, "--data-parallel-size") == "4" and "--enable-expert-parallel" in argv
    no_ep = launch(weights=str(hf_folder), plan=InstancePlan(devices=2, ep=1, batch_per_device=8))
    assert "--enable-expert-parallel" not in vllm_launcher(no_ep, 8200, "127.0.0.1", tmp_path / "l.log").command()
    odd = launch(weights=str(hf_folder), plan=InstancePlan(devices=4, tp=2, ep=2, batch_per_device=8))
    with pytest.raises(UserError, match=r"2 x 2 = 4\), but the plan asks for ep=2"):
        vllm_launcher(odd, 8200, "127.0.0.1", tmp_path / "lane.log")


def test_a_launch_without_a_plan_runs_its_workers_as_data_parallel_ranks(hf_folder, tmp_path):
    argv = vllm_launcher(launch(weights=str(hf_folder), workers=2), 8200, "127.0.0.1", tmp_path / "l.log").command()
    assert (flag(argv, "--tensor-parallel-size"), flag(argv, "--data-parallel-size")) == ("1", "2")
    assert "--enable-expert-parallel" in argv


def test_cpu_threads_are_bound_one_group_of_the_slices_cores_per_rank(home):
    plan = InstancePlan(devices=4, tp=2, ep=4, batch_per_device=8)
    env = vllm_env(launch(devices=(7, 6, 5, 4, 3, 2, 1, 0), plan=plan))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3|4-5|6-7"  # dp x tp = 4 ranks
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "CUDA_VISIBLE_DEVICES" not in env
    assert vllm_env(launch(devices=(0, 2, 3)))["VLLM_CPU_OMP_THREADS_BIND"] == "0,2-3"  # one rank, all cores
    assert thread_binding([0, 1, 2, 3, 4, 5, 6], 3) == "0-2|3-4|5-6"
    with pytest.raises(UserError, match="deployment lane: vLLM runs 4 ranks.*has 2 CPU cores; ask for at least 4"):
        vllm_env(launch(devices=(0, 1), plan=plan))


def test_kv_space_is_the_engine_args_kv_spread_over_the_ranks():
    # tiny-moe: 4 layers x 2 kv heads x 64 dims x (k, v) = 1024 elements per token
    eight_gib = EngineArgs(num_kv_blocks=2**18, block_size=16, dtype="bfloat16")  # 2^22 tokens x 2 KiB
    assert kv_cache_gib(launch(engine_args=eight_gib)) == 8
    assert kv_cache_gib(launch(engine_args=eight_gib, workers=2)) == 4
    assert kv_cache_gib(launch(engine_args=eight_gib.model_copy(update={"dtype": "float32"}), workers=2)) == 8
    assert kv_cache_gib(launch()) == 1  # the default engine_args hold 64 MiB: the 1 GiB floor


def test_a_cuda_slice_is_pinned_by_cuda_visible_devices(hf_folder, tmp_path):
    given = launch(weights=str(hf_folder), device_kind="cuda", devices=(3, 5))
    env = vllm_env(given)
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5" and not any(k.startswith("VLLM_CPU") for k in env)
    launcher = vllm_launcher(given, 8200, "127.0.0.1", tmp_path / "lane.log")
    assert vllm_command(given, launcher) == launcher.command()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_a_cpu_launch_binds_its_cores_before_it_becomes_the_server(hf_folder, tmp_path):
    given = launch(weights=str(hf_folder), devices=(0,))
    launcher = vllm_launcher(given, 8200, "127.0.0.1", tmp_path / "lane.log")
    argv = vllm_command(given, launcher)
    assert argv[:4] == [launcher.command()[0], "-c", PIN_AND_EXEC, "0"] and argv[4:] == launcher.command()[1:]
    # the same program run by this Python: bound first, then exec'd into the given command
    probe = "import os; print(sorted(os.sched_getaffinity(0)), os.getpid())"
    done = subprocess.run([sys.executable, "-c", PIN_AND_EXEC, "0", "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "[0]"


def test_weights_random_and_archs_without_a_model_are_refused():
    with pytest.raises(UserError, match="deployment lane: weights: random is for the builtin engine's smoke tests"):
        check_vllm_model("lane", "tiny-moe", "random")
    with pytest.raises(UserError, match="arch deepseek-v3 has no model folder for vLLM.*matrixstack model add"):
        check_vllm_model("lane", "deepseek-v3", "packaged")
    check_vllm_model("lane", "deepseek-v3", "/somewhere/else")  # a folder is looked for where it runs


def test_a_given_folder_must_be_a_hugging_face_folder(hf_folder, tmp_path):
    assert vllm_model_folder(launch(weights=str(hf_folder))) == hf_folder
    with pytest.raises(UserError, match=r"is not a Hugging Face folder \(no config.json\).*model export"):
        vllm_model_folder(launch(weights=str(tmp_path)))


def test_packaged_weights_are_exported_once_and_again_when_the_package_changes(home, tmp_path, monkeypatch):
    package = tmp_path / "package"
    shutil.copytree(PACKAGED_WEIGHTS["tiny-moe"], package)
    monkeypatch.setitem(vllm_launch.PACKAGED_WEIGHTS, "tiny-moe", package)
    folder = vllm_model_folder(launch())
    assert folder.parent == home / "hf-export" and folder.name.startswith("tiny-moe-")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and (folder / "tokenizer.json").is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert vllm_model_folder(launch()) == folder  # reused, not written again
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    tokenizer = package / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))  # same tokenizer, other bytes
    again = vllm_model_folder(launch())
    assert again != folder and (again / "config.json").is_file()
    assert sorted(p.name for p in (home / "hf-export").iterdir()) == sorted([folder.name, again.name])  # no partial


def test_a_registered_model_is_served_from_its_folder(home):
    exported = vllm_model_folder(launch())
    config, arch_yaml = read_folder(exported, "my-glm")
    register_model("my-glm", exported, config, arch_yaml, ["engine", "vllm"], [])
    assert vllm_model_folder(launch(arch="my-glm")) == exported.resolve()
