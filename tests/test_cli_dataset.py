"""`matrixstack dataset add | list | show | remove` as a user runs it: the installed `matrixstack` command end to end
(the shipped dataset with a split, statistics, the PNG), and exit 2 naming the problem, with nothing stored, for a
bad line, a bad name, another tenant's dataset and a wrong invocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MATRIXSTACK = Path(sys.executable).parent / "matrixstack"
COMMAND_TIMEOUT_S = 120


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Point the data directory (database and dataset files) at a temporary folder; return it."""
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MATRIXSTACK_DB", raising=False)
    return tmp_path / "home"


def matrixstack(*args: str) -> subprocess.CompletedProcess:
    """Run the installed `matrixstack` command with `args`; return the finished process (text output)."""
    return subprocess.run(
        [str(MATRIXSTACK), *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=dict(os.environ)
    )


def _json(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_add_show_list_remove_through_the_installed_command(home, tmp_path):
    added = _json(matrixstack("dataset", "add", "--builtin", "cpython-reference-qa", "--split", "0.9", "--tenant",
                              "acme", "--json"))  # fmt: skip
    assert added["name"] == "cpython-reference-qa" and added["tenant"] == "acme" and added["shape"] == "chat"
    assert added["train_rows"] + added["heldout_rows"] == added["rows"] and added["heldout_rows"] == round(
        added["rows"] * 0.1
    )
    stored = home / "datasets" / f"{added['sha256']}.jsonl"
    assert stored.is_file()

    png = tmp_path / "lengths.png"
    shown = _json(matrixstack("dataset", "show", "cpython-reference-qa", "--tenant", "acme", "--png", str(png),
                              "--json"))  # fmt: skip
    tokens = shown["tokens"]
    assert shown["sha256"] == added["sha256"] and tokens["base"] == "tiny-moe" and tokens["rows"] == added["rows"]
    assert tokens["total_tokens"] == tokens["prompt_tokens"] + tokens["completion_tokens"] > 0
    lengths = tokens["length_percentiles"]
    assert 0 < lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"]
    assert png.read_bytes()[:8] == PNG_SIGNATURE and imread(png).shape[1] >= 800

    text = matrixstack("dataset", "show", "cpython-reference-qa", "--tenant", "acme")
    assert text.returncode == 0 and f"tokens per row: p50 {lengths['p50']}, " in text.stdout
    listed = _json(matrixstack("dataset", "list", "--tenant", "acme", "--json"))
    assert [d["name"] for d in listed] == ["cpython-reference-qa"]
    assert _json(matrixstack("dataset", "list", "--tenant", "other", "--json")) == []
    other = matrixstack("dataset", "show", "cpython-reference-qa", "--tenant", "other")
    assert other.returncode == 2 and "no dataset 'cpython-reference-qa' of tenant 'other'" in other.stderr

    removed = matrixstack("dataset", "remove", "cpython-reference-qa", "--tenant", "acme")
    assert removed.returncode == 0 and "removed dataset cpython-reference-qa of tenant acme" in removed.stdout
    assert not stored.exists() and _json(matrixstack("dataset", "list", "--json")) == []


def test_a_bad_line_exits_2_naming_it_and_stores_nothing(cli, home, tmp_path):
    data = tmp_path / "support.jsonl"
    good = '{"prompt": "Reset my password", "completion": "Use the account page."}'
    data.write_text(f'{good}\n{good}\n{{"prompt": "Hi", "completion": 42}}\n{good}\n')
    result = cli("dataset", "add", str(data), "--name", "support", "--tenant", "acme")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "line 3: completion: expected a string, got number 42" in result.output
    assert "nothing stored" in result.output
    listed = cli("dataset", "list", "--json")
    assert listed.exit_code == 0 and json.loads(listed.output) == []
    assert not (home / "datasets").exists() or not any((home / "datasets").iterdir())

    data.write_text(f"{good}\n{good}\n")
    added = cli("dataset", "add", str(data), "--name", "support", "--tenant", "acme", "--json")
    assert added.exit_code == 0 and json.loads(added.output)["rows"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dataset", "add", "--name", "x"], "give a FILE or --builtin NAME"),
        (["dataset", "add", "f.jsonl", "--builtin", "cpython-reference-qa"], "give a FILE or --builtin NAME"),
        (["dataset", "add", "--builtin", "nope"], "no built-in dataset 'nope'"),
        (["dataset", "add", "missing.jsonl", "--name", "x"], "does not exist"),
        (["dataset", "add", "--builtin", "cpython-reference-qa", "--name", "../x"], "dataset name '../x' is not"),
        (["dataset", "add", "--builtin", "cpython-reference-qa", "--split", "1.2"], "must be a train fraction"),
        (["dataset", "show", "ghost"], "no dataset 'ghost'; see `matrixstack dataset list`"),
        (["dataset", "show", "ghost", "--base", "nope"], "arch nope ships no weights; --base takes a model with"),
        (["dataset", "remove", "ghost", "--tenant", "acme"], "no dataset 'ghost' of tenant 'acme'"),
    ],
)
def test_user_errors_exit_2_without_a_traceback(cli, home, args, message):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_a_file_needs_a_name(cli, home, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    result = cli("dataset", "add", str(data))
    assert result.exit_code == 2 and "--name is required with a FILE" in result.output
