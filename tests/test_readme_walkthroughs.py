"""The walkthroughs in docs/walkthroughs.md (linked from the README) run as written.

A shell block takes part when the line before its ```sh fence is `<!-- walkthrough: NAME -->`; with
`<!-- walkthrough: NAME skip: REASON -->` it needs a server it does not start and is left to be run by hand (the
data engineer's starts its own site and stops it). The blocks of
one walkthrough run in order, as one `bash -euo pipefail` script, in a fresh folder where `examples/` and `src/`
are the repository's, with `MATRIXSTACK_HOME` in that folder and the venv's bin first on PATH. The walkthroughs
that work against the site of `make run` get its state first from `shape import` of the embedded default (what
`matrixstack up` writes before it starts the engines)."""

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "walkthroughs.md"]
MARKER = re.compile(r"^<!-- walkthrough: (?P<name>[a-z-]+)(?: skip: (?P<reason>[^>]+?))? -->\n```sh\n", re.MULTILINE)

# the site of `make run`, without its engines
MAKE_RUN_STATE = "matrixstack shape import examples/shapes/embedded-default.yaml >/dev/null 2>&1\n"
PRELUDES = {"app": MAKE_RUN_STATE, "operator": MAKE_RUN_STATE, "move": MAKE_RUN_STATE}

TIMEOUT_S = {"data": 900}  # a tune job, then a site started and called

# what each walkthrough's output must show: the steps did what the text says they do
EXPECTED = {
    "datacenter": [
        "cloudmatrix384",
        "fabric my-h200-rack",
        "32 x NVIDIA H200 SXM (8 per node)",
        "pool prod: 768 devices over 2 fabric(s)",
        "allocated slice 1 for alice: 12 devices",
        "allocated slice 2 for bob: 3 devices (6 dies)",
        "device 0:3 failed (HBM ECC); slice 1 got 0:15 instead",
        "device 0:3 back in service",
        "replacement=15",
    ],
    "model": [
        "deepseek-v3 on cloudmatrix384 (256 devices)",
        "shape cloudmatrix384-deepseek is valid",
        "shape my-model is valid",
        "EP1 on 1 device",
        "new key 'default' of tenant acme",
        "added L2 tiny-moe-python-grammar under tiny-moe-python",
        "L2 tiny-moe-python-grammar",
        "lineage: tiny-moe → tiny-moe-python → tiny-moe-python-grammar",
    ],
    "app": ["for tenant acme:", "sk-"],
    "data": [
        "shape data-site imported",
        "added dataset cpython-reference-qa of tenant acme: 964 chat rows, 868 train / 96 held out",
        "histogram drawn to lengths.png",
        "job 1 succeeded: adapter",
        "held-out after: loss",
        "registered L1 tiny-moe-cpython under tiny-moe with adapter acme-cpython",
        "added L2 tiny-moe-cpython-sections under tiny-moe-cpython",
        "tiny-moe: '",
        "tiny-moe-cpython: '",
        "tiny-moe-cpython-sections: '",
    ],
    "hf-model": [
        "registered model my-tiny (Glm4MoeForCausalLM): lanes engine, vllm",
        "my-tiny on local",
        "removed model my-tiny",
    ],
    "operator": ["usage by tenant, entry", "globex", "revoked", "tiny-moe", "pool main: 2 devices"],
    "move": [
        "wrote site.yaml",
        "same shape",
        "L2 tiny-moe-faq",
        "wrote manifests/01-hypernodes.yaml",
        "10-deployment-tiny-moe.yaml",
        "shape qwen3-hybrid is valid",
        "HyperNode: 49",
        "shape qwen3-hybrid imported",
    ],
}


def walkthrough_blocks() -> dict[str, list[tuple[str, str | None]]]:
    """Return each walkthrough's shell blocks in document order, as (script, skip reason or None)."""
    blocks: dict[str, list[tuple[str, str | None]]] = {}
    for doc in DOCS:
        text = doc.read_text()
        for m in MARKER.finditer(text):
            end = text.index("\n```\n", m.end() - 1)
            blocks.setdefault(m["name"], []).append((text[m.end() : end + 1], m["reason"]))
    return blocks


BLOCKS = walkthrough_blocks()


def test_every_walkthrough_is_marked_and_checked():
    assert set(BLOCKS) == set(EXPECTED), "a walkthrough marker names no known walkthrough, or one lost its blocks"
    for name, blocks in BLOCKS.items():
        assert any(reason is None for _, reason in blocks), f"walkthrough {name} has no block the test runs"
    skipped = [name for name, blocks in BLOCKS.items() for _, reason in blocks if reason]
    assert {"model", "app", "operator", "move"} <= set(skipped)  # the server parts exist, run by hand


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_walkthrough_runs(name, tmp_path):
    script = "".join(block for block, reason in BLOCKS[name] if reason is None)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "src").symlink_to(ROOT / "src")
    env = {
        **os.environ,
        "MATRIXSTACK_HOME": str(tmp_path / "home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "200",
    }
    env.pop("MATRIXSTACK_DB", None)
    # a session of its own: a site a failed block started in the background is stopped with the script
    walk = subprocess.Popen(
        ["bash", "-c", "set -euo pipefail\n" + PRELUDES.get(name, "") + script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = walk.communicate(timeout=TIMEOUT_S.get(name, 300))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(walk.pid, signal.SIGINT)
        walk.wait(timeout=30)
    assert walk.returncode == 0, f"walkthrough {name} failed (exit {walk.returncode}):\n{output[-4000:]}"
    missing = [s for s in EXPECTED[name] if s not in output]
    assert not missing, f"walkthrough {name}: {missing} not in its output:\n{output[-4000:]}"
