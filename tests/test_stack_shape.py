"""Shapes: validating the examples and bad files through the CLI, applying (idempotent, all or nothing),
exporting and importing again (the same shape, catalog and deployments), and the portal routing an L0 to its
deployment's current URL (503 while it is not running).

Everything runs on SQLite files under tmp_path; the routing test puts a real portal (PortalThread) in front of a
real engine process and calls it with the official `openai` client.
"""

from __future__ import annotations

import json
import sqlite3
from functools import partial
from pathlib import Path

import openai
import pytest
import yaml

from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.database import open_database
from matrixstack.matrix.pools import create_pool, show_pool
from matrixstack.matrix.slices import alloc_slice
from matrixstack.matrix.spec import SliceRequest
from matrixstack.portal.catalog_service import add_entry, get_entry, list_entries
from matrixstack.portal.deployment_service import list_deployments
from matrixstack.portal.key_service import create_key, list_keys, revoke_key
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.upstream_secrets import backend_api_key
from matrixstack.stack.apply import PLACEHOLDER_URL, apply_shape, record_started, record_status, record_stopped
from matrixstack.stack.export import default_shape, export_shape
from matrixstack.stack.site import STATUS_RESTARTING, STATUS_RUNNING, Started
from matrixstack.stack.spec import Shape, load_shape, parse_shape

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "shapes"
PACKAGED_DEFAULT = ROOT / "src" / "matrixstack" / "stack" / "shapes" / "default.yaml"
EXAMPLE_FILES = sorted(EXAMPLES.rglob("*.yaml"))
UPSTREAM_ENV = "MATRIXSTACK_TEST_UPSTREAM_KEY"
DEAD_URL = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there


def tiny_data() -> dict:
    """Return the default shape as data, on one device of this machine (any machine has one) and no pins."""
    data = default_shape().dump()
    deployment = data["deployments"][0]
    deployment["slice"] = {"devices": 1}
    deployment.pop("pins")
    return data


def tiny_shape() -> Shape:
    """Return `tiny_data()` as a Shape with an upstream entry beside the tiny-moe family."""
    data = tiny_data()
    data["catalog"].append(
        {
            "name": "deepseek-r1",
            "level": "L0",
            "provider": "third-party",
            "backend": {"kind": "upstream", "url": "https://api.deepseek.com/v1", "api_key_env": UPSTREAM_ENV},
        }
    )
    return parse_shape(data, "test shape")


def db(tmp_path: Path, name: str) -> str:
    """Return the URL of a SQLite file under tmp_path."""
    return f"sqlite:///{tmp_path / name}.db"


def snapshot(url: str, skip_columns: tuple[str, ...] = ()) -> dict[str, list[tuple]]:
    """Return the rows of every table of a SQLite database that has rows (columns in `skip_columns` left out), by
    table: the data, not the schema (opening a database creates the tables of every layer)."""
    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out = {}
        for table in tables:
            columns = [r[1] for r in con.execute(f"PRAGMA table_info({table})") if r[1] not in skip_columns]
            rows = con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid").fetchall()
            if rows:
                out[table] = rows
        return out
    finally:
        con.close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test reads the user's database: the data directory is tmp_path and MATRIXSTACK_DB is unset."""
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MATRIXSTACK_DB", raising=False)


# --- examples and validation --------------------------------------------------------------------------------


def test_the_examples_are_the_ones_we_mean():
    names = {str(p.relative_to(EXAMPLES)) for p in EXAMPLE_FILES}
    assert names == {
        "embedded-default.yaml",
        "cloudmatrix384.yaml",
        "mixed-lanes.yaml",
        "hybrid/cloud-region.yaml",
        "hybrid/on-prem.yaml",
    }
    assert (EXAMPLES / "embedded-default.yaml").read_bytes() == PACKAGED_DEFAULT.read_bytes()
    assert default_shape() == load_shape(PACKAGED_DEFAULT)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_validates(cli, path):
    if path.name == "embedded-default.yaml" and load_fabric("local").device_count < 2:
        pytest.skip("the embedded default asks for 2 devices; this machine has 1")
    result = cli("shape", "validate", str(path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    shape = load_shape(path)
    assert report["valid"] and report["shape"] == shape.name
    assert [d["name"] for d in report["deployments"]] == [d.name for d in shape.deployments]
    for planned in report["deployments"]:
        assert planned["auto"] == (shape.deployment(planned["name"]).plan == "auto") and planned["workers"] >= 1
        assert planned["predicted"]["tokens_per_s_per_device"] > 0 and planned["predicted"]["tpot_ms"] > 0
        assert planned["predicted"]["devices"] <= planned["slice_devices"]
    text = cli("shape", "validate", str(path))
    assert text.exit_code == 0 and f"shape {shape.name} is valid" in " ".join(text.output.split())


def test_the_examples_plan_what_their_comments_say(cli):
    default = json.loads(cli("shape", "validate", str(PACKAGED_DEFAULT), "--json").output)
    if load_fabric("local").device_count >= 2:
        assert default["deployments"][0]["plan_summary"] == "EP2 on 2 devices"
        assert default["deployments"][0]["workers"] == 2
    cm = json.loads(cli("shape", "validate", str(EXAMPLES / "cloudmatrix384.yaml"), "--json").output)
    plan = cm["deployments"][0]["plan"]
    assert (plan["prefill"]["devices"], plan["prefill"]["instances"], plan["prefill"]["ep"]) == (16, 6, 32)
    assert (plan["decode"]["devices"], plan["decode"]["ep"], plan["decode"]["redundant_experts"]) == (160, 320, 32)
    assert cm["deployments"][0]["workers"] == 320 and cm["deployments"][0]["predicted"]["tpot_ms"] <= 50
    mixed = json.loads(cli("shape", "validate", str(EXAMPLES / "mixed-lanes.yaml"), "--json").output)
    assert [(d["name"], d["plan_summary"]) for d in mixed["deployments"]] == [
        ("tiny-moe-engine", "EP1 on 1 device"),  # one CPU core each
        ("tiny-moe-vllm", "EP1 on 1 device"),
    ]


def test_the_hybrid_pair_differs_only_in_site():
    cloud_text = (EXAMPLES / "hybrid" / "cloud-region.yaml").read_text()
    prem_text = (EXAMPLES / "hybrid" / "on-prem.yaml").read_text()
    assert cloud_text.split("\nsite:\n")[0] == prem_text.split("\nsite:\n")[0]
    cloud, prem = (load_shape(EXAMPLES / "hybrid" / f) for f in ("cloud-region.yaml", "on-prem.yaml"))
    assert cloud.site != prem.site and (cloud.site.name, prem.site.name) == ("cloud-region", "on-prem")
    assert cloud.model_dump(exclude={"site"}) == prem.model_dump(exclude={"site"})


def _write(tmp_path: Path, data: dict | str, name: str = "shape.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _vllm_entry(data: dict) -> None:
    data["catalog"][0]["backend"]["kind"] = "vllm"


def _broken(change) -> dict:
    data = tiny_data()
    change(data)
    return data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name: [unclosed\n", "malformed YAML at line"),
        ("- a list\n", "expected a mapping of fields"),
        (_broken(lambda d: d["deployments"][0].update(arch="no-such-arch")), "deployment tiny-moe: arch: unknown arch"),
        (
            _broken(lambda d: d["deployments"][0].update(slice={"devices": 100_000})),
            "its slice asks for 100000 devices but fabric local has",
        ),
        (
            _broken(lambda d: d["catalog"][0]["backend"].update(deployment="ghost")),
            "catalog entry tiny-moe: deployment 'ghost' is not in deployments",
        ),
        (_broken(lambda d: d["deployments"][0].update(pool="nowhere")), "pool 'nowhere' is not in pools"),
        (
            _broken(lambda d: d["deployments"][0].update(arch="deepseek-v3")),
            "packaged weights exist only for tiny-moe, not deepseek-v3",
        ),
        (
            _broken(lambda d: (d["deployments"][0].update(engine="vllm", weights="random"), _vllm_entry(d))),
            "deployment tiny-moe: weights: random is for the builtin engine's smoke tests; vLLM loads a Hugging Face",
        ),
        (
            _broken(lambda d: (d["deployments"][0].update(engine="vllm", arch="deepseek-v3"), _vllm_entry(d))),
            "arch deepseek-v3 has no model folder for vLLM",
        ),
        (_broken(lambda d: d["deployments"][0].update(pins={"decode.color": 2})), "'color' is not one of"),
        (_broken(lambda d: d.update(fabric="no-such-fabric")), "fabric: unknown fabric 'no-such-fabric'"),
    ],
    ids=[
        "malformed-yaml",
        "not-a-mapping",
        "unknown-arch",
        "slice-larger-than-fabric",
        "missing-deployment",
        "missing-pool",
        "no-packaged-weights",
        "vllm-random-weights",
        "vllm-no-model",
        "unknown-pin",
        "unknown-fabric",
    ],
)
def test_bad_shapes_exit_2_with_a_message(cli, tmp_path, content, message):
    path = _write(tmp_path, content)
    for args in (("validate",), ("import", "--db", db(tmp_path, "bad"))):
        result = cli("shape", *args[:1], str(path), *args[1:])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def _alias_bomb(levels: int = 12) -> str:
    """Return YAML whose every level repeats the one before ten times: 10**levels leaves from a few hundred bytes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe name: x\n", "is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
        (b"#" * (4 * 2**20 + 1), "is larger than 4 MiB"),
        (_alias_bomb().encode(), "more than 100 aliases (*name)"),
    ],
    ids=["not-utf8", "too-large", "alias-bomb"],
)
def test_hostile_shape_files_exit_2_with_a_message_in_bounded_time(cli, tmp_path, content, message):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    result = cli("shape", "validate", str(path))
    assert result.exit_code == 2, result.output[:2000]
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_a_huge_bad_value_is_echoed_shortened(cli, tmp_path):
    data = tiny_data()
    data["version"] = list(range(100_000))
    result = cli("shape", "validate", str(_write(tmp_path, data)))
    assert result.exit_code == 2 and "version: Input should be 1 (got [0, 1, 2, 3, ...])" in result.output
    assert len(result.output) < 2_000, result.output[:2000]


def test_missing_files_and_empty_databases_exit_2(cli, tmp_path):
    result = cli("shape", "validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "nope.yaml does not exist" in result.output
    result = cli("shape", "export", "--db", db(tmp_path, "empty"))
    assert result.exit_code == 2 and "holds no shape yet" in result.output


# --- apply: idempotent, all or nothing -----------------------------------------------------------------------


def test_apply_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv(UPSTREAM_ENV, "sk-upstream-secret")
    url = db(tmp_path, "a")
    shape = tiny_shape()
    first = apply_shape(shape, url)
    made = {(k.tenant, k.name, k.admin) for k in first.new_keys}
    assert made == {("default", "default", False), ("admin", "admin", True)}
    assert first.warnings == []
    (launch,) = first.launches
    assert launch.name == "tiny-moe" and launch.workers == first.planned[0].workers == first.planned[0].plan.ep
    assert len(launch.devices) == 1 and launch.strategy == "STRICT_PACK" and launch.device_kind in ("cpu", "cuda")
    before = snapshot(url, skip_columns=("applied_at",))

    second = apply_shape(shape, url)
    assert second.slices == first.slices and second.new_keys == [] and second.launches == first.launches
    assert snapshot(url, skip_columns=("applied_at",)) == before  # no new row, no changed row, no event

    with open_portal_database(url) as portal:
        deployment = portal.read(list_deployments)[0]
        assert (deployment["status"], deployment["url"]) == ("stopped", PLACEHOLDER_URL)
        assert deployment["slice_id"] == first.slices["tiny-moe"]
        stored = portal.read(lambda session: get_entry(session, "deepseek-r1")).backend
        assert backend_api_key(stored) == "sk-upstream-secret"
        default_key = next(k for k in portal.read(lambda session: list_keys(session, "default")))
        portal.write(lambda session: revoke_key(session, default_key.id))
    monkeypatch.delenv(UPSTREAM_ENV)
    third = apply_shape(shape, url)  # a revoked key is made again; an unset variable keeps the stored secret
    assert [(k.tenant, k.name) for k in third.new_keys] == [("default", "default")]
    assert len(third.warnings) == 1 and UPSTREAM_ENV in third.warnings[0] and "deepseek-r1" in third.warnings[0]
    with open_portal_database(url) as portal:
        stored = portal.read(lambda session: get_entry(session, "deepseek-r1")).backend
        assert backend_api_key(stored) == "sk-upstream-secret"


def test_import_through_the_cli_shows_keys_once(cli, tmp_path):
    path = _write(tmp_path, tiny_data())
    url = db(tmp_path, "cli")
    first = cli("shape", "import", str(path), "--db", url)
    assert first.exit_code == 0, first.output
    assert first.output.count("sk-") == 2 and "will not be shown again" in first.output
    second = cli("shape", "import", str(path), "--db", url)
    assert second.exit_code == 0 and "sk-" not in second.output and "imported" in second.output


def _two_deployments() -> Shape:
    """Return a shape with two 8-device deployments on a CloudMatrix384 (validation passes: 16 <= 384)."""
    data = {
        "name": "two",
        "fabric": "cloudmatrix384",
        "pools": [{"name": "main"}],
        "deployments": [
            {"name": name, "arch": "tiny-moe", "weights": "random", "slice": {"devices": 8}} for name in ("a", "b")
        ],
        "catalog": [{"name": "a", "level": "L0", "backend": {"kind": "engine", "deployment": "a"}}],
        "tenants": [{"name": "acme", "keys": [{"name": "default"}]}],
    }
    return parse_shape(data, "two deployments")


def test_a_failed_apply_leaves_the_database_as_it_was(cli, tmp_path):
    url = db(tmp_path, "busy")
    with open_database(url) as matrix:  # someone holds all but 8 devices: a gets its slice, b cannot
        matrix.write(lambda session: create_pool(session, "main", [load_fabric("cloudmatrix384")]))
        matrix.write(lambda session: alloc_slice(session, "main", "squatter", SliceRequest(devices=376)))
    before = snapshot(url)
    with pytest.raises(UserError, match=r"deployment b: no slice: pool 'main'.*nothing was applied"):
        apply_shape(_two_deployments(), url)
    assert snapshot(url) == before  # a's slice, the tenant, its key, the entry, the stack rows: all rolled back

    path = _write(tmp_path, _two_deployments().dump())
    result = cli("shape", "import", str(path), "--db", url)
    assert result.exit_code == 2 and "deployment b: no slice" in " ".join(result.output.split())
    assert snapshot(url) == before

    other = db(tmp_path, "other")  # a pool of the shape's name over another fabric: named, nothing written
    with open_database(other) as matrix:
        matrix.write(lambda session: create_pool(session, "main", [load_fabric("cloudmatrix384")]))
    before = snapshot(other)
    with pytest.raises(UserError, match="pool main exists over cloudmatrix384"):
        apply_shape(tiny_shape(), other)
    assert snapshot(other) == before


# --- export and import again ---------------------------------------------------------------------------------


def test_export_then_import_gives_the_same_shape_catalog_and_deployments(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(UPSTREAM_ENV, "sk-upstream-secret")
    a, b = db(tmp_path, "a"), db(tmp_path, "b")
    keys = [k.plaintext for k in apply_shape(tiny_shape(), a).new_keys]
    with open_portal_database(a) as portal:  # added by hand after the apply: exported too
        portal.write(
            lambda session: add_entry(
                session, EntrySpec(name="tiny-moe-haiku", level="L2", parent="tiny-moe", system_prompt="Haiku.")
            )
        )
        portal.write(
            lambda session: add_entry(
                session,
                EntrySpec(name="by-hand", level="L0", backend={"kind": "vllm", "url": "http://10.0.0.7:8000/v1"}),
            )
        )
        keys.append(
            portal.write(lambda session: create_key(session, "globex", "ci", rpm_limit=60, token_quota=10_000))[1]
        )

    exported = tmp_path / "exported.yaml"
    assert cli("shape", "export", "--db", a, "--out", str(exported)).exit_code == 0
    text = exported.read_text()
    assert all(secret not in text for secret in ["sk-upstream-secret", *keys]) and len(keys) == 3
    shape = load_shape(exported)
    entries = {e.name: e for e in shape.catalog}
    assert entries["tiny-moe"].backend.deployment == "tiny-moe" and entries["tiny-moe"].backend.url is None
    assert entries["deepseek-r1"].backend.api_key_env == UPSTREAM_ENV
    assert entries["by-hand"].backend.url == "http://10.0.0.7:8000/v1" and entries["by-hand"].backend.deployment is None
    assert "tiny-moe-haiku" in entries
    globex = next(t for t in shape.tenants if t.name == "globex")
    assert [(k.name, k.rpm_limit, k.token_quota) for k in globex.keys] == [("ci", 60, 10_000)]
    assert shape.deployments == tiny_shape().deployments and shape.site == tiny_shape().site

    imported = cli("shape", "import", str(exported), "--db", b)
    assert imported.exit_code == 0, imported.output
    again = cli("shape", "export", "--db", b)
    assert again.exit_code == 0 and again.output == text
    assert export_shape(b) == export_shape(a) == shape

    with open_portal_database(a) as pa, open_portal_database(b) as pb:
        entries = [p.read(partial(list_entries, admin=True)) for p in (pa, pb)]
        catalogs = [[(e.view(), e.backend and backend_api_key(e.backend)) for e in listed] for listed in entries]
        assert catalogs[0] == catalogs[1] and len(catalogs[0]) == 6  # each key sealed by itself, the same opened
        fields = ("name", "kind", "arch", "pool", "status", "url")
        assert [{k: d[k] for k in fields} for d in pa.read(list_deployments)] == [
            {k: d[k] for k in fields} for d in pb.read(list_deployments)
        ]
        slices = []
        for url, portal in ((a, pa), (b, pb)):
            with open_database(url) as matrix:
                held = {s.id: s for s in matrix.read(lambda session: show_pool(session, "main")).slices}
                slices.append([held[d["slice_id"]].device_count for d in portal.read(list_deployments)])
        assert slices[0] == slices[1] == [1]
    plans = [json.loads(cli("shape", "import", str(exported), "--db", u, "--json").output) for u in (a, b)]
    assert [d["plan"] for d in plans[0]["deployments"]] == [d["plan"] for d in plans[1]["deployments"]]
    assert plans[0]["new_keys"] == plans[1]["new_keys"] == []


# --- routing: an L0 follows its deployment -------------------------------------------------------------------


def test_the_portal_routes_to_the_deployments_current_url(tmp_path, engine_process):
    url = db(tmp_path, "route")
    shape = parse_shape(tiny_data(), "tiny")
    applied = apply_shape(shape, url)
    key = next(k.plaintext for k in applied.new_keys if k.tenant == "default")
    _, engine_url = engine_process()
    messages = [{"role": "user", "content": "hello"}]
    with PortalThread(url, cache_ttl_s=0.0) as portal:
        client = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)

        def call():
            return client.chat.completions.create(model="tiny-moe-faq", messages=messages, max_tokens=4)

        with pytest.raises(openai.InternalServerError) as err:  # registered, not started yet
            call()
        assert err.value.status_code == 503 and err.value.code == "deployment_not_running"
        assert "deployment tiny-moe is not running" in err.value.message and "matrixstack up" in err.value.message

        record_started(shape, [Started("tiny-moe", engine_url)], url)
        answer = call()
        assert answer.model == "tiny-moe-faq" and answer.usage.completion_tokens >= 1

        record_started(shape, [Started("tiny-moe", DEAD_URL)], url)  # moved: the portal follows it
        with pytest.raises(openai.InternalServerError) as err:
            call()
        assert err.value.status_code == 503 and err.value.code == "deployment_not_running"  # it answers no more
        assert err.value.response.headers["retry-after"]

        record_started(shape, [Started("tiny-moe", engine_url)], url)
        assert call().usage.completion_tokens >= 1

        record_stopped(shape, url)
        with pytest.raises(openai.InternalServerError) as err:
            call()
        assert err.value.status_code == 503
    with open_portal_database(url) as portal:
        assert portal.read(list_deployments)[0]["url"] == engine_url  # stopped keeps the last URL


def test_a_crashed_deployment_is_503_at_the_second_request_whatever_the_cache(tmp_path):
    """A site's on_status records a crash (`restarting`); the portal, which cached the deployment's URL a minute
    long, answers 503 with Retry-After when the URL does not answer, drops that resolution, and answers 503 from
    the deployment's status from the next request on."""
    url = db(tmp_path, "crash")
    shape = parse_shape(tiny_data(), "tiny")
    applied = apply_shape(shape, url)
    key = next(k.plaintext for k in applied.new_keys if k.tenant == "default")
    messages = [{"role": "user", "content": "hello"}]
    with PortalThread(url, cache_ttl_s=60.0) as portal:
        client = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)
        record_status(shape, "tiny-moe", STATUS_RUNNING, DEAD_URL, url)  # running, then its engine dies
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="tiny-moe-faq", messages=messages, max_tokens=4)
        assert err.value.status_code == 503 and "cannot be reached" in err.value.message
        assert err.value.response.headers["retry-after"]
        record_status(shape, "tiny-moe", STATUS_RESTARTING, DEAD_URL, url)  # what the site's watcher records
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="tiny-moe-faq", messages=messages, max_tokens=4)
        assert err.value.status_code == 503 and "restarting" in err.value.message
        assert err.value.response.headers["retry-after"]
    with open_portal_database(url) as portal_db:
        (row,) = portal_db.read(list_deployments)
        assert (row["status"], row["url"]) == (STATUS_RESTARTING, DEAD_URL)
        assert portal_db.read(lambda session: get_entry(session, "tiny-moe")).backend.url == DEAD_URL.rstrip("/")
