"""`matrixstack tune`: LoRA jobs on slices of the local pool, run as a user runs them: real `matrixstack` processes,
real torch training, a job killed with SIGKILL mid-run and resumed to the same weights, two gloo ranks, cancel,
`--register`, and bad input refused with nothing written (no job row, no slice held, no adapter folder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matrixstack.adapt.dataset_file import parse_dataset
from matrixstack.adapt.datasets import add_dataset
from matrixstack.adapt.job_store import open_tune_database
from matrixstack.engine.lora_adapter import CONFIG_FILE, WEIGHTS_FILE

ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": str(a + b)} for a in range(8) for b in range(5)]
MATRIXSTACK = [sys.executable, "-c", "from matrixstack.cli.main import app; app()"]
RUN_TIMEOUT_S = 600.0
POLL_S = 0.02
TRAIN = ["--batch-size", "4", "--lr", "1e-2", "--max-len", "64"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """Return a fresh data directory with the operator's dataset `sums` (80% train) and tenant acme's `acme-sums`."""
    home = tmp_path / "home"
    monkeypatch.setenv("MATRIXSTACK_HOME", str(home))
    data = parse_dataset("".join(json.dumps(r) + "\n" for r in ROWS), "test rows")
    with open_tune_database(None) as database:
        add_dataset(database, "sums", data, None, split=0.8)
        add_dataset(database, "acme-sums", data, "acme", split=0.8)
    return home


def tune(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `matrixstack tune ARGS` in a new process and return it (asserting exit 0 when `check`)."""
    done = subprocess.run([*MATRIXSTACK, "tune", *args], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def jobs(cli) -> list[dict]:
    result = cli("tune", "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def allocated(cli) -> int:
    """Return the devices held by live slices over every pool."""
    return sum(p["allocated"] for p in json.loads(cli("matrix", "list", "--json").output))


def weights(home: Path, adapter: str) -> dict[str, torch.Tensor]:
    return load_file(str(home / "adapters" / adapter / WEIGHTS_FILE))


@pytest.mark.parametrize(
    "args, message",
    [
        (["tiny-moe", "--rank", "65"], "--rank 65 is outside 1..64"),
        (["tiny-moe", "--target", "q,experts"], "--target experts is not supported"),
        (["deepseek-v3", "--target", "q,k"], "base deepseek-v3 has no q_proj in layer 0's attention"),
        (["tiny-moe", "--tenant", "globex", "--dataset", "acme-sums"], "no dataset 'acme-sums' of tenant 'globex'"),
        (["tiny-moe", "--devices", "64", "--batch-size", "64"], "no slice of 64 device(s)"),
        (["tiny-moe", "--register", "kw"], "no L0 catalog entry serves tiny-moe"),
        (["tiny-moe", "--method", "full"], "only lora is supported"),
        (["tiny-moe", "--epochs", "1"], "give exactly one of --steps S or --epochs E"),
    ],
)
def test_bad_input_is_refused_with_nothing_written(home, cli, args, message):
    defaults = {"--dataset": "sums", "--out": "kw"}
    extra = [x for flag, value in defaults.items() if flag not in args for x in (flag, value)]
    result = cli("tune", *args, *extra, "--steps", "2")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert jobs(cli) == [] and allocated(cli) == 0
    assert not (home / "adapters").exists()


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(home, cli):
    steps = ["--steps", "60", "--checkpoint-every", "4", *TRAIN]
    tune("tiny-moe", "--dataset", "sums", "--out", "whole", *steps)
    killed = subprocess.Popen(
        [*MATRIXSTACK, "tune", "tiny-moe", "--dataset", "sums", "--out", "resumed", *steps],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = home / "tune" / "2" / "checkpoint.pt"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    reached = torch.load(checkpoint, weights_only=True)["step"]
    assert 4 <= reached < 60, "the job was not killed mid-run"

    job = next(j for j in jobs(cli) if j["id"] == 2)  # `tune list` found its process gone
    assert job["status"] == "failed" and job["slice_id"] is None and "tune --resume 2" in job["error"]
    assert allocated(cli) == 0 and not (home / "adapters" / "resumed").exists()

    tune("--resume", "2")
    job = next(j for j in jobs(cli) if j["id"] == 2)
    assert job["status"] == "succeeded" and job["progress"] == {"step": 60, "steps": 60, **job["progress"]}
    whole, resumed = weights(home, "whole"), weights(home, "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    result = job["result"]
    assert result["after"]["loss"] < result["before"]["loss"] and result["after"]["examples"] == 8
    log = json.loads(Path(result["log"]).read_text())
    assert [s["step"] for s in log["steps"]] == list(range(1, 61))
    assert Path(result["loss_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((home / "adapters" / "resumed" / CONFIG_FILE).read_text())["r"] == 8
    assert allocated(cli) == 0


@pytest.mark.slow
def test_two_gloo_ranks_train_what_one_device_trains(home, cli):
    tune("tiny-moe", "--dataset", "sums", "--out", "one", "--steps", "6", *TRAIN)
    tune("tiny-moe", "--dataset", "sums", "--out", "two", "--steps", "6", "--devices", "2", *TRAIN)
    logs = [json.loads(Path(j["result"]["log"]).read_text()) for j in jobs(cli)]
    assert [log["summary"]["devices"] for log in logs] == [[0], [0, 1]]
    first = [log["steps"][0]["loss"] for log in logs]
    assert abs(first[0] - first[1]) < 1e-5  # the same batch, the same start: the gradient split over two ranks
    one, two = weights(home, "one"), weights(home, "two")
    scale = max(float(t.abs().max()) for t in one.values())
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 0.01 * scale
    assert allocated(cli) == 0


@pytest.mark.slow
def test_cancel_stops_the_running_job_and_frees_its_slice(home, cli):
    running = subprocess.Popen(
        [*MATRIXSTACK, "tune", "tiny-moe", "--dataset", "sums", "--out", "long", "--steps", "100000", *TRAIN,
         "--checkpoint-every", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not jobs(cli) or not jobs(cli)[0]["progress"]:
            assert running.poll() is None and time.monotonic() < deadline
            time.sleep(POLL_S * 10)
        assert allocated(cli) == 1
        assert cli("tune", "cancel", "1", "--tenant", "acme").exit_code == 2  # not acme's job
        result = cli("tune", "cancel", "1")
        assert result.exit_code == 0, result.output
        assert running.wait(timeout=30) == -signal.SIGKILL
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    job = jobs(cli)[0]
    assert job["status"] == "cancelled" and job["slice_id"] is None and allocated(cli) == 0
    assert not (home / "adapters" / "long").exists()
    result = cli("tune", "--resume", "1")
    assert result.exit_code == 2 and "only a failed or killed job resumes" in result.output


def test_register_makes_the_l1_of_the_adapter_under_the_l0_serving_the_base(home, cli):
    from matrixstack.portal.catalog_service import add_entry, resolve_entry, update_entry
    from matrixstack.portal.spec import EntrySpec
    from matrixstack.portal.store import open_portal_database

    backend = {"kind": "engine", "url": "http://127.0.0.1:9/v1", "model": "tiny-moe", "adapters": False}
    with open_portal_database(None) as database:
        database.write(lambda s: add_entry(s, EntrySpec(name="tiny", level="L0", backend=backend)))
    args = ["tiny-moe", "--dataset", "acme-sums", "--tenant", "acme", "--out", "acme-kw", "--steps", "2", *TRAIN]
    result = cli("tune", *args, "--register", "acme-sums-l1")
    assert result.exit_code == 2 and "does not serve adapters by name" in " ".join(result.output.split())
    assert jobs(cli) == [] and allocated(cli) == 0
    with open_portal_database(None) as database:
        database.write(lambda s: update_entry(s, "tiny", {"backend": {"adapters": True}}))
    result = cli("tune", *args, "--register", "acme-sums-l1", "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)  # the progress bar went to stderr
    assert job["status"] == "succeeded" and job["tenant"] == "acme" and job["result"]["before"]["examples"] == 8
    entry = job["registered"]
    assert (entry["level"], entry["parent"], entry["adapter"], entry["owner"]) == ("L1", "tiny", "acme-kw", "acme")
    assert os.path.isdir(job["adapter_path"]) and job["adapter_path"].endswith("adapters/acme-kw")
    with open_portal_database(None) as database:
        l2 = EntrySpec(name="acme-terse", level="L2", parent="acme-sums-l1", owner="acme", system_prompt="Be terse.")
        database.write(lambda s: add_entry(s, l2))
        resolved = database.read(lambda s: resolve_entry(s, "acme-terse", "acme"))
    assert resolved.adapter == "acme-kw"
    assert cli("tune", "show", str(job["id"]), "--tenant", "globex").exit_code == 2  # another tenant's job
    assert [j["id"] for j in jobs(cli)] == [job["id"]]
    result = cli("tune", "tiny-moe", "--dataset", "sums", "--out", "acme-kw", "--steps", "2")
    assert result.exit_code == 2 and "exists; pick another name" in result.output


SHAPE = """version: 1
name: reclaim
fabric: local
pools: [{{name: p}}]
deployments:
  - {{name: tiny, arch: tiny-moe, weights: packaged, engine: matrixstack, pool: p, slice: {{devices: {devices}}},
      workload: {{precision: fp32}}}}
"""


@pytest.mark.parametrize("allocator", ["matrix alloc", "shape import"])
def test_a_killed_job_s_slice_goes_to_the_next_allocation(home, cli, tmp_path, allocator):
    """A job whose process died (SIGKILL: no code of its ran) holds its slice only until the next allocation: other
    commands than `tune` take the pool's devices with the dead job's slice freed and the job marked failed."""
    from matrixstack.adapt.job_store import TuneJobRow
    from matrixstack.adapt.jobs import submit_job
    from matrixstack.adapt.spec import TuneSpec
    from matrixstack.fabric.loader import load_fabric
    from matrixstack.matrix.pools import create_pool

    devices = load_fabric("local").device_count
    dead = subprocess.Popen(["true"])
    dead.wait()
    spec = TuneSpec(base="tiny-moe", dataset="sums", targets=["q_proj"], steps=2, out="kw", devices=devices,
                    batch_size=devices)  # fmt: skip
    with open_tune_database(None) as database:
        database.write(lambda session: create_pool(session, "p", [load_fabric("local")]))
        job, _ = database.write(lambda session: submit_job(session, None, spec, "p"))

        def died(session) -> None:  # the process the row records is gone (as after SIGKILL)
            session.get(TuneJobRow, job.id).pid = dead.pid

        database.write(died)
    assert allocated(cli) == devices
    if allocator == "matrix alloc":
        result = cli("matrix", "alloc", "--pool", "p", "--tenant", "acme", "--devices", str(devices), "--json")
    else:
        shape = tmp_path / "shape.yaml"
        shape.write_text(SHAPE.format(devices=devices))
        result = cli("shape", "import", str(shape), "--json")
    assert result.exit_code == 0, result.output
    (swept,) = jobs(cli)
    assert swept["status"] == "failed" and swept["slice_id"] is None and f"tune --resume {job.id}" in swept["error"]
    assert allocated(cli) == devices  # the new allocation's, the dead job's freed
