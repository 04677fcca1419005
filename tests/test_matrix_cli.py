"""`matrixstack matrix ...` as a user runs it: exit codes, JSON keys, the heat map, errors without tracebacks."""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Point the data directory at a temporary folder; return it."""
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MATRIXSTACK_DB", raising=False)
    return tmp_path / "home"


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.slow
def test_create_alloc_fail_repair_free_show_round_trip(cli, home, tmp_path):
    created = _json(cli("matrix", "create", "--fabric", "cloudmatrix384", "--json"))
    assert created["pool"] == "default" and created["devices"] == 384
    assert (home / "matrixstack.db").is_file()  # the default database lives in the data directory

    a = _json(cli("matrix", "alloc", "--devices", "12", "--tenant", "alice", "--json"))
    assert set(a) >= {"id", "tenant", "state", "devices", "nodes", "tier", "dies", "ranks", "policy", "constraints"}
    assert len(a["devices"]) == 12 and a["nodes"] == [0, 1] and a["dies"] == 24 and a["tier"] == "L2"
    b = _json(cli("matrix", "alloc", "--devices", "12", "--tenant", "bob", "--policy", "server", "--json"))
    assert len(b["devices"]) == 16
    c = _json(cli("matrix", "alloc", "--dies", "5", "--tenant", "bob", "--within-tier", "1", "--json"))
    assert len(c["devices"]) == 3 and len(c["nodes"]) == 1 and c["requested_dies"] == 5

    failed = _json(cli("matrix", "fail", "--device", f"0:{a['devices'][0]}", "--reason", "ECC", "--json"))
    assert failed["action"] == "replaced" and failed["slice"] == a["id"]
    result = cli("matrix", "fail", "--device", f"0:{a['devices'][0]}")
    assert result.exit_code == 2 and "failed already" in result.output

    png = tmp_path / "pool.png"
    view = _json(cli("matrix", "show", "--png", str(png), "--json"))
    assert set(view) == {"pool", "fabrics", "stats", "slices", "failures", "tenants"}
    assert view["stats"]["allocated"] == 12 + 16 + 3 and view["stats"]["failed"] == 1
    assert view["tenants"] == {"alice": 12, "bob": 19}
    assert png.read_bytes()[:8] == PNG_SIGNATURE and imread(png).shape[1] >= 800

    mine = _json(cli("matrix", "show", "--tenant", "bob", "--json"))
    assert [s["id"] for s in mine["slices"]] == [b["id"], c["id"]] and "tenants" not in mine
    result = cli("matrix", "free", str(a["id"]), "--tenant", "bob")
    assert result.exit_code == 2 and f"no live slice {a['id']} of tenant 'bob'" in result.output

    repaired = _json(cli("matrix", "repair", "--device", f"0:{a['devices'][0]}", "--json"))
    assert repaired == {"device": f"0:{a['devices'][0]}", "healed_slices": []}
    resized = _json(cli("matrix", "resize", str(a["id"]), "--devices", "4", "--tenant", "alice", "--json"))
    assert len(resized["devices"]) == 4
    assert _json(cli("matrix", "free", str(a["id"]), "--tenant", "alice", "--json"))["state"] == "freed"

    kinds = [e["kind"] for e in _json(cli("matrix", "events", "--json"))]
    assert kinds == ["create", "alloc", "alloc", "alloc", "fail", "replace", "repair", "resize", "free"]
    pools = _json(cli("matrix", "list", "--json"))
    assert [(p["pool"], p["allocated"], p["slices"]) for p in pools] == [("default", 19, 2)]

    text = cli("matrix", "show")
    assert text.exit_code == 0 and "pool default" in text.output and "bob" in text.output


def test_user_errors_exit_2_without_a_traceback(cli, home, tmp_path):
    cases = [
        (["matrix", "alloc", "--devices", "1", "--tenant", "a"], "no pool named 'default'"),
        (["matrix", "create", "--fabric", "nope"], "unknown fabric 'nope'"),
        (["matrix", "show", "--db", "nope://x"], "'nope' is not supported"),
        (["matrix", "show", "--db", "postgresql+psycopg://u@127.0.0.1:1/x"], "cannot open database"),
        (["matrix", "free", "999"], "no live slice 999"),
        (["matrix", "fail", "--device", "x"], "is not F:D or D"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert cli("matrix", "create", "--fabric", "cloudmatrix384").exit_code == 0
    for args, message in [
        (["--devices", "9", "--within-tier", "L1"], "largest holds 8 devices"),
        (["--devices", "1", "--within-tier", "L7"], "has no tier 'L7'"),
        (["--devices", "2", "--dies", "4"], "exactly one of --devices N or --dies N"),
        (["--devices", "1", "--policy", "best"], "unknown policy 'best'"),
        (["--devices", "400"], "does not fit in any domain"),
    ]:
        result = cli("matrix", "alloc", "--tenant", "alice", *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    result = cli("matrix", "create", "--fabric", "cloudmatrix384")
    assert result.exit_code == 2 and "exists already" in result.output


def test_db_url_option_points_at_another_database(cli, home, tmp_path):
    url = f"sqlite:///{tmp_path / 'other' / 'pool.db'}"
    assert cli("matrix", "create", "--pool", "lab", "--fabric", "dgx-h800", "--count", "2", "--db", url).exit_code == 0
    across = _json(cli("matrix", "alloc", "--pool", "lab", "--devices", "16", "--tenant", "t", "--cross-domain",
                       "--db", url, "--json"))  # fmt: skip
    assert across["nodes"] == [0, 1] and across["tier"] == "leaf"
    assert not (home / "matrixstack.db").exists()
    assert _json(cli("matrix", "list", "--db", url, "--json"))[0]["devices"] == 2 * 256
