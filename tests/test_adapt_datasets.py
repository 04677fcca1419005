"""Datasets (adapt.dataset_file, adapt.datasets, adapt.dataset_stats): every line validated and a bad one named by
number and field, stored by sha256 with a row in the matrix's database (SQLite and PostgreSQL), the held-out split
deterministic and disjoint, tenants seeing only their own datasets, token statistics with tiny-moe's tokenizer,
and the shipped dataset valid and up to date with the script that makes it."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from matrixstack.adapt import dataset_file
from matrixstack.adapt.dataset_file import builtin_names, builtin_path, parse_dataset, read_dataset
from matrixstack.adapt.dataset_stats import base_tokenizer, row_texts, token_stats
from matrixstack.adapt.dataset_store import DatasetRow, dataset_path, datasets_dir, open_adapt_database
from matrixstack.adapt.datasets import (
    UnknownDataset,
    add_dataset,
    find_dataset,
    heldout_indices,
    list_datasets,
    load_split,
    remove_dataset,
)
from matrixstack.errors import UserError
from matrixstack.matrix.store import TenantRow

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "Answer briefly."}


def chat(i: int) -> dict:
    return {
        "messages": [SYSTEM, {"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"a{i}"}]
    }


def chat_data(rows: int = 20, start: int = 0):
    return parse_dataset("".join(json.dumps(chat(i)) + "\n" for i in range(start, start + rows)), "test rows")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Point the data directory (where the dataset files go) at a temporary folder; return it."""
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def database(db_url, home):
    with open_adapt_database(db_url) as opened:
        yield opened


def stored_files() -> list[Path]:
    return sorted(datasets_dir().iterdir()) if datasets_dir().exists() else []


# ---- validation ---------------------------------------------------------------------------------------------

GOOD = json.dumps(chat(0))
BAD_LINES = [
    ("{nope", "line 2: not JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", "line 2: expected a JSON object, got array"),
    ('{"messages": []}', "line 2: messages: expected a non-empty list of messages, got []"),
    ('{"messages": "hi"}', "line 2: messages: expected a non-empty list of messages, got 'hi'"),
    ('{"mesages": []}', "line 2: mesages: unknown field; a chat row has only messages"),
    ('{"messages": [1]}', "line 2: messages[0]: expected an object with role and content, got number"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "line 2: messages[0].role: 'bot' is not one of system"),
    ('{"messages": [{"content": "x"}]}', "line 2: messages[0].role: missing"),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}',
        "line 2: messages[1].role: the last message must be the assistant's",
    ),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
        '{"role": "assistant", "content": "y"}]}',
        "line 2: messages[1].role: a system message may only come first",
    ),
    (
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
        "line 2: messages[0].content: expected a string, got number 5",
    ),
    ('{"messages": [{"role": "assistant"}]}', "line 2: messages[0].content: missing"),
    ('{"messages": [{"role": "assistant", "content": ""}]}', "line 2: messages[0].content: empty"),
    (
        '{"messages": [{"role": "user", "content": "x", "name": "n"}, {"role": "assistant", "content": "y"}]}',
        "line 2: messages[0].name: unknown field; a message has only role and content",
    ),
    (
        '{"messages": [{"role": "user", "content": "x<|eos|>"}, {"role": "assistant", "content": "y"}]}',
        "line 2: messages[0].content: contains <|eos|>, a special token of the tokenizer",
    ),
    ('{"prompt": "x", "completion": "y"}', "line 2: a completion row in a chat dataset (its first row decides)"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m.split(": ", 1)[1][:40] for _, m in BAD_LINES])
def test_a_bad_chat_line_is_named_by_number_and_field(line, message):
    with pytest.raises(UserError) as caught:
        parse_dataset(f"{GOOD}\n{line}\n{GOOD}\n", "qa.jsonl")
    assert "qa.jsonl: 1 bad line(s), nothing stored" in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x"}', "line 2: completion: missing"),
        ('{"prompt": "x", "completion": ""}', "line 2: completion: empty"),
        ('{"prompt": null, "completion": "y"}', "line 2: prompt: expected a string, got null"),
        ('{"prompt": "x", "completion": "y", "id": 3}', "line 2: id: unknown field; a completion row has only"),
        ('{"prompt": "<|user|>", "completion": "y"}', "line 2: prompt: contains <|user|>"),
        (GOOD, "line 2: a chat row in a completion dataset"),
    ],
)
def test_a_bad_completion_line_is_named_by_number_and_field(line, message):
    good = '{"prompt": "", "completion": "y"}'  # an empty prompt is allowed: the completion is what is learned
    with pytest.raises(UserError, match="1 bad line") as caught:
        parse_dataset(f"{good}\n{line}\n", "c.jsonl")
    assert message in str(caught.value)


def test_every_line_is_checked_blank_lines_keep_their_numbers_and_the_count_is_bounded():
    bad = "\n".join([GOOD, "", "x", *(["[]"] * 12), GOOD]) + "\n"
    message = str(pytest.raises(UserError, parse_dataset, bad, "f").value)
    assert "13 bad line(s)" in message and "line 3: not JSON" in message and "line 4: expected a JSON object" in message
    assert message.count("\n  line ") == dataset_file.MAX_REPORTED and "... and 3 more bad line(s)" in message
    data = parse_dataset(f"\n{GOOD}\n   \n{GOOD}", "f")  # blank lines skipped, no final newline needed
    assert len(data.rows) == 2 and data.shape == "chat"


def test_file_level_problems_are_clear(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="holds no rows"):
        read_dataset(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_dataset(latin)
    with pytest.raises(UserError, match="does not exist"):
        read_dataset(tmp_path / "missing.jsonl")
    big = tmp_path / "big.jsonl"
    big.write_text(GOOD + "\n")
    monkeypatch.setattr(dataset_file, "MAX_DATASET_BYTES", 2**20)
    big.write_text((GOOD + "\n") * (2**20 // len(GOOD) + 1))
    with pytest.raises(UserError, match="larger than 1 MiB, too large for a dataset"):
        read_dataset(big)
    monkeypatch.setattr(dataset_file, "MAX_ROWS", 5)
    with pytest.raises(UserError, match="more than 5 rows"):
        parse_dataset((GOOD + "\n") * 6, "f")


def test_canonical_bytes_ignore_spacing_and_key_order():
    row = chat(1)
    spaced = json.dumps(row, indent=None, separators=(" , ", " : "))
    reordered = json.dumps({"messages": [dict(reversed(list(m.items()))) for m in row["messages"]]})
    a, b = parse_dataset(spaced + "\n", "a"), parse_dataset(reordered + "\r\n", "b")
    assert a.canonical == b.canonical and a.sha256 == b.sha256
    assert parse_dataset(json.dumps(chat(2)), "c").sha256 != a.sha256


# ---- split --------------------------------------------------------------------------------------------------


def test_the_split_is_deterministic_disjoint_and_sized():
    first = heldout_indices(1000, 0.9, seed=0)
    assert first == heldout_indices(1000, 0.9, seed=0) and len(first) == 100 and first == sorted(first)
    assert first != heldout_indices(1000, 0.9, seed=1) and len(heldout_indices(1000, 0.9, seed=1)) == 100
    assert first[:5] != [0, 1, 2, 3, 4]  # shuffled, not the tail or the head of the file
    assert heldout_indices(10, None, 0) == [] and len(heldout_indices(3, 0.5, 0)) == 1
    for split, problem in [(0.0, "between 0 and 1"), (1.0, "between 0 and 1"), (1.5, "between 0 and 1")]:
        with pytest.raises(UserError, match=problem):
            heldout_indices(10, split, 0)
    with pytest.raises(UserError, match="leaves no held-out row"):
        heldout_indices(4, 0.9, 0)
    with pytest.raises(UserError, match="leaves no row to train on"):
        heldout_indices(4, 0.1, 0)


# ---- storage, on SQLite and PostgreSQL ---------------------------------------------------------------------


def test_add_list_find_load_remove_round_trip(database, home):
    data = chat_data(20)
    info = add_dataset(database, "qa", data, "alice", split=0.8, seed=7)
    assert (info.name, info.tenant, info.shape, info.rows, info.train_rows, info.heldout_rows) == (
        "qa", "alice", "chat", 20, 16, 4,
    )  # fmt: skip
    assert info.sha256 == data.sha256 and info.size_bytes == len(data.canonical) and info.split == 0.8
    path = dataset_path(info.sha256)
    assert path.read_bytes() == data.canonical
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    assert database.read(lambda s: find_dataset(s, "qa", "alice")) == info
    assert database.read(lambda s: list_datasets(s, "alice")) == [info]
    train = database.read(lambda s: load_split(s, "qa", "alice", "train"))
    heldout = database.read(lambda s: load_split(s, "qa", "alice", "heldout"))
    assert len(train) == 16 and len(heldout) == 4
    held = heldout_indices(20, 0.8, 7)
    assert heldout == [data.rows[i] for i in held]  # the recorded split, rows as validated
    assert train == [row for i, row in enumerate(data.rows) if i not in held]  # the rest, in file order
    with pytest.raises(UserError, match="split 'test' is not one of train, heldout"):
        database.read(lambda s: load_split(s, "qa", "alice", "test"))

    assert remove_dataset(database, "qa", "alice") == info
    assert not path.exists() and database.read(lambda s: list_datasets(s, None)) == []
    with pytest.raises(UnknownDataset, match="no dataset 'qa' of tenant 'alice'"):
        remove_dataset(database, "qa", "alice")


def test_no_split_trains_on_every_row_and_holds_none_out(database):
    add_dataset(database, "all", chat_data(5), None)
    assert len(database.read(lambda s: load_split(s, "all", None, "train"))) == 5
    assert database.read(lambda s: load_split(s, "all", None, "heldout")) == []


def test_tenants_see_only_their_own_datasets(database):
    alice = add_dataset(database, "qa", chat_data(10), "alice", split=0.8)
    never_added = pytest.raises(UnknownDataset, database.read, lambda s: find_dataset(s, "zz", "bob")).value
    for op in (lambda s: find_dataset(s, "qa", "bob"), lambda s: load_split(s, "qa", "bob", "train")):
        with pytest.raises(UnknownDataset) as caught:
            database.read(op)
        assert str(caught.value) == str(never_added).replace("'zz'", "'qa'")  # the words of a name nobody has
    with pytest.raises(UnknownDataset, match="no dataset 'qa'; see `matrixstack dataset list`"):
        database.read(lambda s: load_split(s, "qa", None, "train"))  # the operator's own: alice's is not one
    with pytest.raises(UnknownDataset, match="no dataset 'qa' of tenant 'bob'"):
        remove_dataset(database, "qa", "bob")
    bob = add_dataset(database, "qa", chat_data(3, start=100), "bob")  # the same name, bob's own
    operator = add_dataset(database, "qa", chat_data(4, start=200), None)
    assert database.read(lambda s: list_datasets(s, "alice")) == [alice]
    assert database.read(lambda s: list_datasets(s, "bob")) == [bob]
    assert database.read(lambda s: list_datasets(s, None)) == [operator, alice, bob]  # the operator sees all
    assert database.read(lambda s: list_datasets(s, "carol")) == []
    tenants = database.read(lambda s: sorted(s.scalars(select(TenantRow.name))))
    assert tenants == ["alice", "bob"]  # looking as carol created no tenant
    assert len(database.read(lambda s: load_split(s, "qa", "bob", "train"))) == 3
    assert remove_dataset(database, "qa", "bob") == bob
    assert database.read(lambda s: list_datasets(s, None)) == [operator, alice]


def test_a_name_is_unique_per_owner_and_never_a_path(database):
    add_dataset(database, "qa", chat_data(3), "alice")
    with pytest.raises(UserError, match="dataset 'qa' of tenant 'alice' exists already"):
        add_dataset(database, "qa", chat_data(4), "alice")
    add_dataset(database, "qa", chat_data(3), None)
    with pytest.raises(UserError, match="dataset 'qa' exists already"):
        add_dataset(database, "qa", chat_data(4), None)
    for name in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(UserError, match="dataset name .* is not allowed"):
            add_dataset(database, name, chat_data(3), None)
    with pytest.raises(UserError, match="tenant name '../t' is not allowed"):
        add_dataset(database, "ok", chat_data(3), "../t")
    assert database.read(lambda s: s.scalar(select(func.count()).select_from(DatasetRow))) == 2
    assert len(stored_files()) == 1  # one file: both have the same rows


def test_datasets_with_the_same_rows_share_one_file_until_the_last_goes(database):
    a = add_dataset(database, "a", chat_data(6), "alice")
    b = add_dataset(database, "b", chat_data(6), "bob")
    assert a.sha256 == b.sha256 and stored_files() == [dataset_path(a.sha256)]
    remove_dataset(database, "a", "alice")
    assert stored_files() == [dataset_path(a.sha256)]
    remove_dataset(database, "b", "bob")
    assert stored_files() == []


def test_a_file_that_cannot_be_written_leaves_no_row(database, home):
    home.mkdir(parents=True, exist_ok=True)
    datasets_dir().write_text("in the way")  # the folder cannot be made
    with pytest.raises(UserError, match="cannot write"):
        add_dataset(database, "qa", chat_data(3), "alice")
    assert database.read(lambda s: list_datasets(s, None)) == []


def test_a_changed_or_missing_file_is_an_error_not_wrong_rows(database):
    info = add_dataset(database, "qa", chat_data(3), None)
    path = dataset_path(info.sha256)
    path.write_bytes(path.read_bytes().replace(b"a1", b"a9"))
    with pytest.raises(UserError, match="was changed since it was added"):
        database.read(lambda s: load_split(s, "qa", None, "train"))
    path.unlink()
    with pytest.raises(UserError, match="cannot be read"):
        database.read(lambda s: load_split(s, "qa", None, "train"))


# ---- token statistics and the shipped dataset --------------------------------------------------------------


def test_token_stats_count_the_template_the_model_sees():
    tokenizer = base_tokenizer("tiny-moe")
    rows = [chat(1), chat(22), {"messages": [{"role": "assistant", "content": "hello there"}]}]
    stats = token_stats(rows, tokenizer, "tiny-moe")
    prompt = tokenizer.encode(
        "<|bos|><|system|>\nAnswer briefly.<|eos|>\n<|user|>\nquestion 1?<|eos|>\n<|assistant|>\n"
    )
    assert row_texts(rows[0], tokenizer)[0] == tokenizer.apply_chat_template(rows[0]["messages"][:2])
    assert stats.prompt_lengths[0] == len(prompt) and stats.completion_lengths[0] == len(tokenizer.encode("a1")) + 1
    assert stats.prompt_lengths[2] == len(tokenizer.encode("<|bos|><|assistant|>\n"))
    totals = [p + c for p, c in zip(stats.prompt_lengths, stats.completion_lengths, strict=True)]
    assert stats.total_tokens == sum(totals) == stats.prompt_tokens + stats.completion_tokens
    assert stats.length_percentiles == {
        "p50": sorted(totals)[1],
        "p90": max(totals),
        "p99": max(totals),
        "max": max(totals),
    }
    completion = token_stats([{"prompt": "x", "completion": "y"}], tokenizer, "tiny-moe")
    assert completion.prompt_lengths == [len(tokenizer.encode("x", add_bos=True))]
    with pytest.raises(UserError, match="ships no weights"):
        base_tokenizer("llama-3.1-8b")


def test_the_shipped_dataset_validates_and_is_the_scripts_output():
    assert "cpython-reference-qa" in builtin_names()
    data = read_dataset(builtin_path("cpython-reference-qa"))
    assert data.shape == "chat" and 300 <= len(data.rows) <= 2000
    answers = [row["messages"][-1]["content"] for row in data.rows]
    assert len({row["messages"][1]["content"] for row in data.rows}) == len(data.rows)  # no question twice
    assert len(set(answers)) >= 50 and max(answers.count(a) for a in set(answers)) < len(answers) / 10
    stats = token_stats(data.rows, base_tokenizer("tiny-moe"), "tiny-moe")
    assert stats.length_percentiles["max"] <= 256  # short rows: a few hundred steps on a CPU
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_reference_qa.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(UserError, match="built-in datasets: cpython-reference-qa"):
        builtin_path("nope")
