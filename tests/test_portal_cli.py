"""`matrixstack catalog | tenant | key | deployment | usage` as a user runs them, on a SQLite file under tmp_path.

The sub-apps are mounted on a small Typer app here, the way cli/main.py mounts them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from matrixstack.cli.portal_cmd import catalog_app, deployment_app, key_app, parse_since, tenant_app, usage
from matrixstack.errors import UserError
from matrixstack.portal.catalog_service import get_entry
from matrixstack.portal.key_service import authenticate, create_key
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.upstream_secrets import backend_api_key
from matrixstack.portal.usage_service import UsageRecord, record_usage

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "catalog"
FAMILY = str(EXAMPLES / "tiny-moe-family.yaml")
DEEPSEEK_KEY = "sk-REPLACE-WITH-YOUR-DEEPSEEK-KEY"

app = typer.Typer()
app.add_typer(catalog_app, name="catalog")
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.add_typer(deployment_app, name="deployment")
app.command("usage")(usage)


@pytest.fixture
def db(tmp_path, monkeypatch):
    """Return the URL of a SQLite file under tmp_path; MATRIXSTACK_DB is unset so --db is what counts."""
    monkeypatch.delenv("MATRIXSTACK_DB", raising=False)
    return f"sqlite:///{tmp_path / 'portal.db'}"


@pytest.fixture
def run(db):
    """Return a function that runs a command with --db and returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [*args, "--db", db], catch_exceptions=False)

    return invoke


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.stderr.split())  # Rich wraps long lines


def test_catalog_add_list_show_tree_remove(run):
    added = _json(run("catalog", "add", FAMILY, "--json"))
    assert [e["name"] for e in added] == ["tiny-moe", "tiny-moe-python", "tiny-moe-python-grammar"]
    assert "added L0 deepseek-r1 (third-party)" in run("catalog", "add", str(EXAMPLES / "deepseek-r1.yaml")).output
    listed = _json(run("catalog", "list", "--json"))
    assert [e["name"] for e in listed] == ["deepseek-r1", *[e["name"] for e in added]]
    assert listed[0]["backend"]["api_key"] == "set" and listed[1]["backend"]["api_key"] is None
    for args in (("catalog", "list"), ("catalog", "show", "deepseek-r1"), ("catalog", "show", "deepseek-r1", "--json")):
        result = run(*args)
        assert result.exit_code == 0 and DEEPSEEK_KEY not in result.output, args
    shown = run("catalog", "show", "tiny-moe-python-grammar")
    assert shown.exit_code == 0
    assert "lineage: tiny-moe → tiny-moe-python → tiny-moe-python-grammar" in shown.output
    assert "engine http://127.0.0.1:8001/v1" in shown.output and "(from tiny-moe)" in shown.output
    assert _json(run("catalog", "show", "tiny-moe-python", "--json"))["adapter"] == "python-docs-lora"

    tree = run("catalog", "tree")
    assert tree.exit_code == 0
    lines = tree.output.splitlines()
    row = {name: next(i for i, line in enumerate(lines) if f" {name} " in line) for name in [e["name"] for e in listed]}
    assert row["tiny-moe"] < row["tiny-moe-python"] < row["tiny-moe-python-grammar"]
    assert "L0 deepseek-r1 third-party · upstream" in lines[row["deepseek-r1"]]
    assert "L2 tiny-moe-python-grammar first-party · engine" in lines[row["tiny-moe-python-grammar"]]
    indent = [len(lines[row[n]]) - len(lines[row[n]].lstrip("│├└─ ")) for n in ("tiny-moe", "tiny-moe-python")]
    assert indent[0] < indent[1]  # the child is drawn under its parent
    assert _json(run("catalog", "tree", "--json"))[1]["children"][0]["children"][0]["name"] == "tiny-moe-python-grammar"

    assert "entry 'tiny-moe' has children tiny-moe-python" in _error(run("catalog", "remove", "tiny-moe"))
    assert "removed L2 tiny-moe-python-grammar" in run("catalog", "remove", "tiny-moe-python-grammar").output
    assert "exists already; replace it (catalog add --replace)" in _error(run("catalog", "add", FAMILY))
    assert run("catalog", "add", FAMILY, "--replace").exit_code == 0


def test_show_json_added_back_with_replace_keeps_the_upstream_secret(run, db, tmp_path):
    run("catalog", "add", str(EXAMPLES / "deepseek-r1.yaml"))
    shown = run("catalog", "show", "deepseek-r1", "--json").stdout
    edited = tmp_path / "edited.json"
    edited.write_text(shown.replace("DeepSeek-R1 reasoning model", "edited"))
    assert run("catalog", "add", str(edited), "--replace").exit_code == 0
    with open_portal_database(db) as svc:
        entry = svc.read(lambda session: get_entry(session, "deepseek-r1"))
    assert entry.description.startswith("edited") and backend_api_key(entry.backend) == DEEPSEEK_KEY


def test_catalog_errors_exit_2_with_a_clear_message(run, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlevel: [L0\n")
    assert f"catalog file {bad}: malformed YAML at line" in _error(run("catalog", "add", str(bad)))
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("name: kid\nlevel: L1\nparent: nobody\n")
    message = _error(run("catalog", "add", str(orphan)))
    assert "parent: entry 'kid' names parent 'nobody', which is not in the catalog; add the parent first" in message
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("name: x\nlevel: L1\nparent: p\nbackend: {kind: engine, url: 'http://h/v1'}\n")
    assert "backend: only an L0 entry has a backend" in _error(run("catalog", "add", str(invalid)))
    assert "does not exist" in _error(run("catalog", "add", str(tmp_path / "missing.yaml")))
    assert "unknown model 'ghost'" in _error(run("catalog", "show", "ghost"))
    assert "unknown model 'ghost'" in _error(run("catalog", "remove", "ghost"))
    assert "is not a database URL" in _error(CliRunner().invoke(app, ["catalog", "list", "--db", "nonsense"]))


def test_tenants_and_keys(run, db, tmp_path):
    assert run("tenant", "add", "acme").exit_code == 0
    created = run("key", "create", "--tenant", "acme", "--name", "ci", "--rpm", "60", "--quota", "1000")
    assert created.exit_code == 0
    plaintext = next(word for word in created.stdout.split() if word.startswith("sk-") and len(word) > 40)
    assert "it will not be shown again" in created.stderr
    as_json = _json(run("key", "create", "--tenant", "ops", "--admin", "--json"))
    assert as_json["key"].startswith("sk-") and as_json["is_admin"] and as_json["tenant"] == "ops"

    keys = _json(run("key", "list", "--json"))
    assert [(k["tenant"], k["name"], k["rpm_limit"], k["token_quota"]) for k in keys] == [
        ("acme", "ci", 60, 1000),
        ("ops", "default", None, None),
    ]
    prefix = keys[0]["prefix"]
    assert plaintext.startswith(prefix) and all("key" not in k for k in keys)
    table = run("key", "list", "--tenant", "acme")
    assert prefix in table.output and plaintext not in table.output and "ops" not in table.output
    assert [t["name"] for t in _json(run("tenant", "list", "--json"))] == ["acme", "ops"]

    limits = _json(run("key", "limits", prefix, "--tpm", "500", "--rpm", "0", "--json"))
    assert (limits["rpm_limit"], limits["tpm_limit"], limits["token_quota"]) == (None, 500, 1000)
    assert "give at least one of --rpm, --tpm, --quota" in _error(run("key", "limits", prefix))
    assert "greater than or equal to 1" in _error(run("key", "limits", prefix, "--tpm", "-3"))
    assert "revoked key" in run("key", "revoke", prefix).output
    assert _json(run("key", "list", "--tenant", "acme", "--json"))[0]["revoked"] is True
    assert "no API key 'sk-unknown'" in _error(run("key", "revoke", "sk-unknown"))
    assert "tenant name 'bad name' is not allowed" in _error(run("key", "create", "--tenant", "bad name"))
    with open_portal_database(db) as svc:
        assert (
            svc.read(lambda session: authenticate(session, plaintext)) is None
            and svc.read(lambda session: authenticate(session, as_json["key"])).is_admin
        )
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("portal.db*"))
    assert plaintext.encode() not in stored and as_json["key"].encode() not in stored


def test_deployments(run):
    added = _json(run("deployment", "add", "tiny", "--kind", "engine", "--url", "http://127.0.0.1:8001/v1", "--json"))
    assert added["kind"] == "engine" and added["pool"] is None
    assert "tiny" in run("deployment", "list").output
    assert [d["name"] for d in _json(run("deployment", "list", "--json"))] == ["tiny"]
    assert "is not known; use engine or vllm" in _error(
        run("deployment", "add", "x", "--kind", "k8s", "--url", "http://h/v1")
    )
    assert "pool 'nope' has no slice 3" in _error(
        run("deployment", "add", "x", "--kind", "vllm", "--url", "http://h/v1", "--pool", "nope", "--slice", "3")
    )
    assert "removed deployment tiny" in run("deployment", "remove", "tiny").output
    assert "no deployment 'tiny'" in _error(run("deployment", "remove", "tiny"))


def test_usage_table_and_json(run, db):
    with open_portal_database(db) as svc:
        a, _ = svc.write(lambda session: create_key(session, "acme"))
        b, _ = svc.write(lambda session: create_key(session, "bob"))
        svc.write(
            lambda session: record_usage(
                session,
                [
                    UsageRecord(a.tenant_id, a.id, "tiny-moe", 10, 5, 200, 20.0, 4.0),
                    UsageRecord(a.tenant_id, a.id, "tiny-moe-python", 3, 0, 429, 1.0),
                    UsageRecord(b.tenant_id, b.id, "tiny-moe", 2, 2, 200, 9.0, 1.0),
                    UsageRecord(
                        b.tenant_id, b.id, "tiny-moe", 50, 50, 200, 9.0, 1.0, datetime.now(UTC) - timedelta(days=3)
                    ),
                ],
            )
        )
    by_tenant = _json(run("usage", "--json"))
    assert [(r["tenant"], r["requests"], r["total_tokens"], r["errors"]) for r in by_tenant] == [
        ("acme", 2, 18, 1),
        ("bob", 2, 104, 0),
    ]
    recent = _json(run("usage", "--by", "tenant,entry", "--since", "24h", "--json"))
    assert [(r["tenant"], r["entry"], r["total_tokens"]) for r in recent] == [
        ("acme", "tiny-moe", 15),
        ("acme", "tiny-moe-python", 3),
        ("bob", "tiny-moe", 4),
    ]
    assert [r["key"] for r in _json(run("usage", "--by", "key", "--json"))] == sorted([a.prefix, b.prefix])
    table = run("usage", "--by", "entry", "--since", "7d")
    assert table.exit_code == 0 and "tiny-moe-python" in table.output and "usage by entry since" in table.output
    pages = [_json(run("usage", "--by", "entry", "--limit", "1", "--offset", str(o), "--json")) for o in (0, 1, 2)]
    assert [[r["entry"] for r in page] for page in pages] == [["tiny-moe"], ["tiny-moe-python"], []]
    assert "--offset 1" in run("usage", "--by", "entry", "--limit", "1").output  # says where the next page starts
    refused = run("usage", "--limit", "100000")
    assert refused.exit_code == 2 and "limit" in refused.output
    assert "--since 'yesterday' is neither an ISO time" in _error(run("usage", "--since", "yesterday"))
    assert "group by model: unknown" in _error(run("usage", "--by", "tenant,model"))


def test_parse_since():
    now = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now) == datetime(2025, 1, 31, 10, 30, tzinfo=UTC)
    assert parse_since("7d", now) == datetime(2025, 1, 24, 12, 0, tzinfo=UTC)
    assert parse_since("2025-01-30T08:00") == datetime(2025, 1, 30, 8, 0, tzinfo=UTC)
    assert parse_since("2025-01-30T08:00+01:00").utcoffset() == timedelta(hours=1)
    with pytest.raises(UserError):
        parse_since("1w")
