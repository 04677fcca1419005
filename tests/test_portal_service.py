"""Portal state on SQLite and on a real PostgreSQL server: catalog rules, visibility, keys, deployments, usage.

The databases come from conftest.py's `db_url`: a SQLite file under tmp_path, and a fresh database on a
throwaway PostgreSQL server when one can be started here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from matrixstack.errors import SpecError, UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.database import Database, open_database
from matrixstack.matrix.pools import create_pool, show_pool
from matrixstack.matrix.slices import alloc_slice, free_slice
from matrixstack.matrix.spec import SliceRequest
from matrixstack.matrix.tenants import create_tenant
from matrixstack.portal.catalog_service import (
    add_entries,
    add_entry,
    catalog_tree,
    entry_chain,
    get_entry,
    list_entries,
    remove_entry,
    resolve_entry,
    update_entry,
)
from matrixstack.portal.deployment_service import list_deployments, register_deployment, remove_deployment
from matrixstack.portal.key_service import authenticate, create_key, list_keys, list_tenants, revoke_key, set_key_limits
from matrixstack.portal.keys import hash_key
from matrixstack.portal.spec import BackendSpec, EntrySpec, UnknownEntry, load_entries, parse_entries
from matrixstack.portal.store import CatalogEntryRow, open_portal_database
from matrixstack.portal.upstream_secrets import backend_api_key
from matrixstack.portal.usage_service import UsageRecord, record_usage, tokens_used, usage_report

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "catalog"
SECRET = "sk-upstream-secret-0123456789"


@pytest.fixture
def svc(db_url):
    with open_portal_database(db_url) as database:
        yield database


def _l0(name: str = "base", **extra) -> EntrySpec:
    backend = BackendSpec(kind="upstream", url="https://upstream.example/v1", api_key=SECRET)
    return EntrySpec(name=name, level="L0", backend=backend, **extra)


def _family(svc: Database) -> None:
    def add(session: Session) -> None:
        add_entry(session, _l0(parameter_ranges={"temperature": (0.0, 1.0)}))
        add_entry(session, EntrySpec(name="legal", level="L1", parent="base", system_prompt="law"))
        add_entry(session, EntrySpec(name="contracts", level="L2", parent="legal", stop=["END"]))
        add_entry(session, EntrySpec(name="quick", level="L2", parent="base", parameters={"temperature": 0.2}))

    svc.write(add)


# --- specs on their own -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "a", "level": "L0", "parent": "b", "backend": {"kind": "vllm", "url": "http://h/v1"}},
         "parent: an L0 entry is a foundation model and has no parent; drop 'b'"),
        ({"name": "a", "level": "L1"}, "parent: an L1 entry needs a parent (L0 entry)"),
        ({"name": "a", "level": "L2"}, "parent: an L2 entry needs a parent (L1 or L0 entry)"),
        ({"name": "a", "level": "L0"}, "backend: an L0 entry needs a backend (kind engine, upstream or vllm, and url)"),
        ({"name": "a", "level": "L1", "parent": "b", "backend": {"kind": "vllm", "url": "http://h/v1"}},
         "backend: only an L0 entry has a backend; an L1 entry uses its L0's"),
        ({"name": "a", "level": "L1", "parent": "b", "parameters": {"temprature": 1}},
         "parameters: unknown parameter(s) temprature; allowed: temperature, top_p, max_tokens"),
        ({"name": "a", "level": "L1", "parent": "b", "parameter_ranges": {"beam": [1, 2]}},
         "parameter_ranges: unknown parameter(s) beam"),
        ({"name": "a", "level": "L1", "parent": "b", "parameter_ranges": {"top_p": [0.9, 0.1]}},
         "parameter_ranges.top_p: [0.9, 0.1] is empty; write [min, max]"),
        ({"name": "a", "level": "L1", "parent": "b", "parameters": {"top_p": 1.5},
          "parameter_ranges": {"top_p": [0, 1]}},
         "parameters.top_p: default 1.5 is outside its own range [0, 1]; change the default or the range"),
        ({"name": "a b", "level": "L1", "parent": "b"}, "name 'a b' is not allowed: use 1-128 letters"),
        ({"name": "a", "level": "L0", "backend": {"kind": "engine", "url": "ftp://h/v1"}},
         "url 'ftp://h/v1' is not an http(s) URL"),
        ({"name": "a", "level": "L0", "backend": {"kind": "upstream", "url": "https://h/v1", "deployment": "d"}},
         "deployment: an upstream backend has no deployment"),
        ({"name": "a", "level": "L3"}, "level: Input should be 'L0', 'L1' or 'L2'"),
        ({"name": "a", "level": "L1", "parent": "b", "temperature": 1}, "temperature: Extra inputs are not permitted"),
        ({"entries": []}, "`entries:` must be a non-empty list of entries"),
        ({"entries": [{"name": "a", "level": "L1", "parent": "b"}, {"name": "a", "level": "L1", "parent": "b"}]},
         "entry name(s) a appear more than once"),
    ],
)  # fmt: skip
def test_each_spec_rule_is_a_spec_error_naming_the_field(data, message):
    with pytest.raises(SpecError) as caught:
        parse_entries(data, "catalog file x.yaml")
    assert message in str(caught.value) and str(caught.value).startswith("catalog file x.yaml")


def test_the_example_catalogs_are_valid():
    family = load_entries(EXAMPLES / "tiny-moe-family.yaml")
    assert [(e.name, e.level, e.parent) for e in family] == [
        ("tiny-moe", "L0", None),
        ("tiny-moe-python", "L1", "tiny-moe"),
        ("tiny-moe-python-grammar", "L2", "tiny-moe-python"),
    ]
    assert family[0].backend.kind == "engine" and family[0].backend.url == "http://127.0.0.1:8001/v1"
    assert family[1].knowledge and family[1].adapter and family[1].system_prompt and family[1].parameters
    assert family[2].stop and family[2].parameter_ranges and family[2].parameters and family[2].system_prompt
    (deepseek,) = load_entries(EXAMPLES / "deepseek-r1.yaml")
    assert deepseek.provider == "third-party" and deepseek.backend.kind == "upstream" and deepseek.backend.api_key


# --- catalog rules between entries --------------------------------------------------------------------------


def test_parent_rules_between_entries(svc):
    _family(svc)
    with pytest.raises(UserError, match="names parent 'nowhere', which is not in the catalog; add the parent first"):
        svc.write(lambda session: add_entry(session, EntrySpec(name="x", level="L1", parent="nowhere")))
    with pytest.raises(UserError, match="'x' is an L1 entry, so its parent must be an L0 entry, but 'legal' is L1"):
        svc.write(lambda session: add_entry(session, EntrySpec(name="x", level="L1", parent="legal")))
    with pytest.raises(UserError, match="its parent must be an L1 or an L0 entry, but 'contracts' is L2"):
        svc.write(lambda session: add_entry(session, EntrySpec(name="x", level="L2", parent="contracts")))
    with pytest.raises(UserError, match="entry 'legal' exists already; replace it"):
        svc.write(lambda session: add_entry(session, EntrySpec(name="legal", level="L1", parent="base")))
    with pytest.raises(UserError, match=r"parameter_ranges.temperature of 'x': \[2, 3\] does not overlap"):
        svc.write(
            lambda session: add_entry(
                session, EntrySpec(name="x", level="L1", parent="base", parameter_ranges={"temperature": (2, 3)})
            )
        )
    with pytest.raises(UserError, match="parameters.temperature of 'x': default 1.5 is outside the range"):
        svc.write(
            lambda session: add_entry(
                session, EntrySpec(name="x", level="L1", parent="base", parameters={"temperature": 1.5})
            )
        )
    assert "x" not in {
        e.name for e in svc.read(lambda session: list_entries(session, admin=True))
    }  # a refused entry leaves nothing behind


def test_replacing_keeps_children_and_refuses_a_change_that_breaks_them(svc):
    _family(svc)
    svc.write(
        lambda session: add_entry(
            session, EntrySpec(name="legal", level="L1", parent="base", system_prompt="new law"), replace=True
        )
    )
    assert svc.read(lambda session: get_entry(session, "legal")).system_prompt == "new law"
    assert [e.name for e in svc.read(lambda session: entry_chain(session, "contracts"))] == [
        "base",
        "legal",
        "contracts",
    ]
    with pytest.raises(UserError, match="'contracts' is an L2 entry, so its parent must be an L1 or an L0 entry, but"):
        svc.write(lambda session: add_entry(session, EntrySpec(name="legal", level="L2", parent="base"), replace=True))
    with pytest.raises(UserError, match=r"parameters.temperature of 'quick': default 0.2 is outside"):
        svc.write(lambda session: update_entry(session, "base", {"parameter_ranges": {"temperature": (0.5, 1.0)}}))
    assert svc.read(lambda session: get_entry(session, "legal")).level == "L1"  # both changes rolled back
    assert svc.read(lambda session: get_entry(session, "base")).parameter_ranges == {"temperature": (0.0, 1.0)}
    with pytest.raises(UserError, match="an entry cannot be renamed"):
        svc.write(lambda session: update_entry(session, "legal", {"name": "other"}))
    with pytest.raises(SpecError, match="changes to entry 'legal'"):
        svc.write(lambda session: update_entry(session, "legal", {"level": "L9"}))
    assert (
        svc.write(lambda session: update_entry(session, "legal", {"description": "law firms"})).description
        == "law firms"
    )


def test_add_entries_is_all_or_nothing_and_orders_parents_first(svc):
    child = EntrySpec(name="kid", level="L1", parent="root")
    bad = EntrySpec(name="bad", level="L1", parent="missing")
    with pytest.raises(UserError, match="parent 'missing'"):
        svc.write(lambda session: add_entries(session, [child, _l0("root"), bad]))
    assert svc.read(lambda session: list_entries(session, admin=True)) == []
    added = svc.write(lambda session: add_entries(session, [child, _l0("root")]))
    assert [e.name for e in added] == ["root", "kid"]


def test_private_entries_are_invisible_to_other_tenants(svc):
    _family(svc)
    svc.write(lambda session: add_entry(session, EntrySpec(name="acme-bot", level="L2", parent="legal", owner="acme")))
    svc.write(lambda session: add_entry(session, _l0("acme-base", owner="acme")))
    with pytest.raises(UserError, match="parent 'acme-base' is private to tenant 'acme', so 'other' must be too"):
        svc.write(lambda session: add_entry(session, EntrySpec(name="other", level="L1", parent="acme-base")))
    svc.write(
        lambda session: add_entry(session, EntrySpec(name="acme-l1", level="L1", parent="acme-base", owner="acme"))
    )
    public = {"base", "legal", "contracts", "quick"}
    assert {e.name for e in svc.read(lambda session: list_entries(session, "bob"))} == public
    assert {e.name for e in svc.read(lambda session: list_entries(session, "acme"))} == public | {
        "acme-bot",
        "acme-base",
        "acme-l1",
    }
    assert len(svc.read(lambda session: list_entries(session, admin=True))) == 7
    with pytest.raises(UnknownEntry) as hidden:
        svc.read(lambda session: resolve_entry(session, "acme-bot", "bob"))
    with pytest.raises(UnknownEntry) as missing:
        svc.read(lambda session: resolve_entry(session, "no-such", "bob"))
    assert str(hidden.value) == str(missing.value).replace("no-such", "acme-bot")  # no hint that it exists
    assert svc.read(lambda session: resolve_entry(session, "acme-bot", "acme")).chain == ["base", "legal", "acme-bot"]
    assert svc.read(lambda session: resolve_entry(session, "acme-bot", "bob", admin=True)).entry == "acme-bot"
    assert svc.read(lambda session: resolve_entry(session, "legal", None)).system_prompt == "law"
    assert "acme" in {t["name"] for t in svc.read(list_tenants)}  # an owner named for the first time is created
    with pytest.raises(UnknownEntry, match="unknown model 'nope'"):
        svc.read(lambda session: get_entry(session, "nope"))


def test_remove_refuses_an_entry_with_children(svc):
    _family(svc)
    with pytest.raises(UserError, match="entry 'base' has children legal, quick; remove them first"):
        svc.write(lambda session: remove_entry(session, "base"))
    with pytest.raises(UserError, match="entry 'legal' has children contracts"):
        svc.write(lambda session: remove_entry(session, "legal"))
    with Session(svc.engine) as session, pytest.raises(IntegrityError):  # the database refuses too (RESTRICT)
        with session.begin():
            session.execute(delete(CatalogEntryRow).where(CatalogEntryRow.name == "legal"))
    for name in ("contracts", "legal", "quick", "base"):
        assert svc.write(partial(remove_entry, name=name)).name == name
    assert svc.read(lambda session: list_entries(session, admin=True)) == []
    with pytest.raises(UnknownEntry):
        svc.write(lambda session: remove_entry(session, "base"))


def test_the_tree_nests_the_lineage_with_the_l0_backend_kind(svc):
    _family(svc)
    svc.write(lambda session: add_entry(session, EntrySpec(name="e0", level="L0", provider="third-party",
                            backend=BackendSpec(kind="vllm", url="http://127.0.0.1:9/v1"))))  # fmt: skip
    assert svc.read(catalog_tree) == [
        {"name": "base", "level": "L0", "provider": "first-party", "backend_kind": "upstream", "owner": None,
         "children": [
             {"name": "legal", "level": "L1", "provider": "first-party", "backend_kind": "upstream", "owner": None,
              "children": [{"name": "contracts", "level": "L2", "provider": "first-party", "backend_kind": "upstream",
                            "owner": None, "children": []}]},
             {"name": "quick", "level": "L2", "provider": "first-party", "backend_kind": "upstream", "owner": None,
              "children": []}]},
        {"name": "e0", "level": "L0", "provider": "third-party", "backend_kind": "vllm", "owner": None, "children": []},
    ]  # fmt: skip


def test_the_backend_secret_is_kept_but_never_shown(svc):
    svc.write(lambda session: add_entry(session, _l0()))
    stored = svc.read(lambda session: get_entry(session, "base")).backend
    assert stored.api_key.startswith("enc:v1:") and backend_api_key(stored) == SECRET  # sealed, opened to forward
    assert backend_api_key(svc.read(lambda session: resolve_entry(session, "base", None)).backend) == SECRET
    view = svc.read(lambda session: get_entry(session, "base")).view()
    assert view["backend"]["api_key"] == "set" and SECRET not in str(view)
    assert SECRET not in repr(svc.read(lambda session: get_entry(session, "base"))) and SECRET not in str(
        svc.read(catalog_tree)
    )
    assert all(SECRET not in str(e.view()) for e in svc.read(lambda session: list_entries(session, admin=True)))
    changed = svc.write(lambda session: update_entry(session, "base", {"backend": {"url": "https://other.example/v1"}}))
    assert changed.backend.api_key == stored.api_key  # the same seal: an update leaves the key's row as it was
    shown = EntrySpec.model_validate(view)  # what `catalog show --json` printed, added back with --replace
    assert backend_api_key(svc.write(lambda session: add_entry(session, shown, replace=True)).backend) == SECRET
    svc.write(
        lambda session: add_entry(
            session, _l0("plain").model_copy(update={"backend": BackendSpec(kind="vllm", url="http://h:1/v1")})
        )
    )
    assert svc.read(lambda session: get_entry(session, "plain")).view()["backend"]["api_key"] is None


# --- tenants and keys ---------------------------------------------------------------------------------------


def test_tenants_are_the_matrix_layers_tenants(svc, db_url):
    assert (
        svc.write(lambda session: create_tenant(session, "acme")) == "acme"
        and svc.write(lambda session: create_tenant(session, "acme")) == "acme"
    )
    with open_database(db_url) as matrix:
        matrix.write(lambda session: create_pool(session, "p", [load_fabric("cloudmatrix384")]))
        matrix.write(lambda session: alloc_slice(session, "p", "acme", SliceRequest(devices=2)))
        matrix.write(lambda session: alloc_slice(session, "p", "bob", SliceRequest(devices=2)))
    assert [t["name"] for t in svc.read(list_tenants)] == ["acme", "bob"]
    with pytest.raises(UserError, match="tenant name 'no way' is not allowed"):
        svc.write(lambda session: create_tenant(session, "no way"))


def test_keys_are_stored_as_hashes_and_revoked_keys_fail(svc, db_url, tmp_path):
    info, plaintext = svc.write(
        lambda session: create_key(session, "acme", "ci", rpm_limit=60, tpm_limit=1000, token_quota=50_000)
    )
    assert plaintext.startswith("sk-") and len(plaintext) > 40 and info.prefix == plaintext[:12]
    assert (info.tenant, info.name, info.is_admin, info.revoked) == ("acme", "ci", False, False)
    assert (info.rpm_limit, info.tpm_limit, info.token_quota) == (60, 1000, 50_000)
    admin, admin_key = svc.write(lambda session: create_key(session, "ops", admin=True))
    assert (
        svc.read(lambda session: authenticate(session, plaintext)) == info
        and svc.read(lambda session: authenticate(session, admin_key)).is_admin
    )
    assert (
        svc.read(lambda session: authenticate(session, plaintext + "x")) is None
        and svc.read(lambda session: authenticate(session, "")) is None
    )
    if db_url.startswith("sqlite"):
        svc.close()  # checkpoint the WAL so the file holds everything written
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("matrix.db*"))
        assert plaintext.encode() not in stored and admin_key.encode() not in stored
        assert hash_key(plaintext).encode() in stored
        svc = open_portal_database(db_url)
    assert (
        svc.write(lambda session: revoke_key(session, info.prefix)).revoked
        and svc.read(lambda session: authenticate(session, plaintext)) is None
    )
    assert svc.write(lambda session: revoke_key(session, info.id)).revoked  # twice: no change, no error
    assert svc.read(lambda session: authenticate(session, admin_key)).id == admin.id
    assert [(k.prefix, k.revoked) for k in svc.read(list_keys)] == [(info.prefix, True), (admin.prefix, False)]
    assert [k.id for k in svc.read(lambda session: list_keys(session, "ops"))] == [admin.id] and svc.read(
        lambda session: list_keys(session, "nobody")
    ) == []
    assert {t["name"]: t["keys"] for t in svc.read(list_tenants)} == {"acme": 0, "ops": 1}
    with pytest.raises(UserError, match="no API key 'sk-nothing'"):
        svc.write(lambda session: revoke_key(session, "sk-nothing"))
    svc.close()


def test_key_limits_are_stored_kept_and_cleared(svc):
    info, plaintext = svc.write(lambda session: create_key(session, "acme", rpm_limit=10))
    changed = svc.write(lambda session: set_key_limits(session, info.prefix, tpm=500))
    assert (changed.rpm_limit, changed.tpm_limit, changed.token_quota) == (10, 500, None)
    changed = svc.write(lambda session: set_key_limits(session, str(info.id), rpm=None, quota=1000))
    assert (changed.rpm_limit, changed.tpm_limit, changed.token_quota) == (None, 500, 1000)
    assert svc.read(lambda session: authenticate(session, plaintext)) == changed
    with pytest.raises(UserError, match="rpm_limit: Input should be greater than or equal to 1"):
        svc.write(lambda session: set_key_limits(session, info.prefix, rpm=0))
    with pytest.raises(UserError, match="token_quota"):
        svc.write(lambda session: create_key(session, "acme", token_quota=-5))


# --- deployments --------------------------------------------------------------------------------------------


def test_deployments_register_list_remove(svc, db_url):
    first = svc.write(
        lambda session: register_deployment(session, "tiny", "engine", "http://127.0.0.1:8001/v1", arch="tiny-moe")
    )
    assert first | {"created_at": None} == {
        "name": "tiny", "kind": "engine", "arch": "tiny-moe", "url": "http://127.0.0.1:8001/v1", "pool": None,
        "slice_id": None, "status": "running", "created_at": None,
    }  # fmt: skip
    with open_database(db_url) as matrix:
        matrix.write(lambda session: create_pool(session, "p", [load_fabric("cloudmatrix384")]))
        s = matrix.write(lambda session: alloc_slice(session, "p", "acme", SliceRequest(devices=4)))
    again = svc.write(
        lambda session: register_deployment(
            session, "tiny", "vllm", "http://127.0.0.1:8002/v1", pool="p", slice_id=s.id
        )
    )
    assert (again["kind"], again["pool"], again["slice_id"]) == ("vllm", "p", s.id)
    assert [d["name"] for d in svc.read(list_deployments)] == ["tiny"]
    with pytest.raises(UserError, match=f"pool 'p' has no slice {s.id + 7}"):
        svc.write(
            lambda session: register_deployment(session, "x", "engine", "http://h/v1", pool="p", slice_id=s.id + 7)
        )
    with pytest.raises(UserError, match="needs both --pool and --slice"):
        svc.write(lambda session: register_deployment(session, "x", "engine", "http://h/v1", pool="p"))
    with pytest.raises(UserError, match="deployment kind 'docker' is not known; use engine or vllm"):
        svc.write(lambda session: register_deployment(session, "x", "docker", "http://h/v1"))
    with pytest.raises(UserError, match="deployment url 'h:80' is not an http"):
        svc.write(lambda session: register_deployment(session, "x", "engine", "h:80"))
    assert svc.write(lambda session: remove_deployment(session, "tiny"))["url"] == "http://127.0.0.1:8002/v1"
    assert svc.read(list_deployments) == []
    with pytest.raises(UserError, match="no deployment 'tiny'"):
        svc.write(lambda session: remove_deployment(session, "tiny"))


def test_removing_a_deployment_frees_its_slice_in_the_same_transaction(svc, db_url):
    with open_database(db_url) as matrix:
        matrix.write(lambda session: create_pool(session, "p", [load_fabric("cloudmatrix384")]))
        held = matrix.write(lambda session: alloc_slice(session, "p", "acme", SliceRequest(devices=4)))
        other = matrix.write(lambda session: alloc_slice(session, "p", "acme", SliceRequest(devices=4)))
        svc.write(
            lambda session: register_deployment(session, "a", "engine", "http://h/v1", pool="p", slice_id=held.id)
        )
        svc.write(
            lambda session: register_deployment(session, "b", "engine", "http://h/v1", pool="p", slice_id=other.id)
        )
        removed = svc.write(lambda session: remove_deployment(session, "a"))
        assert (removed["slice_id"], removed["slice_freed"]) == (held.id, True)
        assert [s.id for s in matrix.read(lambda session: show_pool(session, "p").slices)] == [other.id]
        matrix.write(lambda session: free_slice(session, other.id))  # freed by hand before the deployment goes
        assert svc.write(lambda session: remove_deployment(session, "b"))["slice_freed"] is False
        assert svc.read(list_deployments) == []


# --- usage --------------------------------------------------------------------------------------------------


def test_usage_report_sums_by_each_grouping_and_since(svc):
    a, _ = svc.write(lambda session: create_key(session, "acme", "a"))
    b, _ = svc.write(lambda session: create_key(session, "acme", "b"))
    c, _ = svc.write(lambda session: create_key(session, "bob", "c"))
    old = datetime.now(UTC) - timedelta(days=2)

    def rec(key, entry, p, q, status=200, at=None):
        return UsageRecord(key.tenant_id, key.id, entry, p, q, status, 12.5, 3.0, *([at] if at else []))

    svc.write(
        lambda session: record_usage(
            session,
            [
                rec(a, "legal", 10, 20),
                rec(a, "legal", 5, 0, status=429),
                rec(b, "base", 7, 3),
                rec(c, "base", 1, 1, status=500),
                rec(c, "legal", 100, 200, at=old),
                rec(a, "base", 1000, 1000, at=old.replace(tzinfo=None)),  # naive = UTC
            ],
        )
    )
    svc.write(lambda session: record_usage(session, []))

    def row(requests, prompt, completion, errors, **keys):
        total = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return keys | {"requests": requests} | total | {"errors": errors}

    assert svc.read(usage_report) == [row(4, 1022, 1023, 1, tenant="acme"), row(2, 101, 201, 1, tenant="bob")]
    by_key = {r["key"]: r for r in svc.read(lambda session: usage_report(session, ["key"]))}
    assert by_key == {
        a.prefix: row(3, 1015, 1020, 1, key=a.prefix),
        b.prefix: row(1, 7, 3, 0, key=b.prefix),
        c.prefix: row(2, 101, 201, 1, key=c.prefix),
    }
    assert svc.read(lambda session: usage_report(session, ("entry",))) == [
        row(3, 1008, 1004, 1, entry="base"),
        row(3, 115, 220, 1, entry="legal"),
    ]
    assert svc.read(lambda session: usage_report(session, ("tenant", "entry"))) == [
        row(2, 1007, 1003, 0, tenant="acme", entry="base"),
        row(2, 15, 20, 1, tenant="acme", entry="legal"),
        row(1, 1, 1, 1, tenant="bob", entry="base"),
        row(1, 100, 200, 0, tenant="bob", entry="legal"),
    ]
    since = datetime.now(UTC) - timedelta(hours=1)
    assert svc.read(lambda session: usage_report(session, ("tenant",), since=since)) == [
        row(3, 22, 23, 1, tenant="acme"),
        row(1, 1, 1, 1, tenant="bob"),
    ]
    assert svc.read(lambda session: usage_report(session, (), since=since.replace(tzinfo=None))) == [row(4, 23, 24, 2)]
    assert svc.read(lambda session: usage_report(session, (), since=datetime.now(UTC) + timedelta(hours=1))) == [
        row(0, 0, 0, 0)
    ]
    assert (
        svc.read(lambda session: tokens_used(session, a.id)) == 2035
        and svc.read(lambda session: tokens_used(session, b.id)) == 10
        and svc.read(lambda session: tokens_used(session, 999)) == 0
    )
    with pytest.raises(UserError, match="group by model: unknown; group by any of tenant, key, entry"):
        svc.read(lambda session: usage_report(session, ("tenant", "model")))


def test_state_survives_reopening_the_database(db_url):
    with open_portal_database(db_url) as first:
        _family(first)
        info, plaintext = first.write(lambda session: create_key(session, "acme"))
    with open_portal_database(db_url) as second:
        assert second.read(lambda session: authenticate(session, plaintext)) == info
        assert [e.name for e in second.read(lambda session: entry_chain(session, "contracts"))] == [
            "base",
            "legal",
            "contracts",
        ]
