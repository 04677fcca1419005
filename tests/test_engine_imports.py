"""The portal process stays free of torch: importing the portal, or the engine package's torch-free modules, must
not import it (torch alone is ~200k objects, which every full garbage collection then walks)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        "matrixstack.portal.app, matrixstack.portal.server",
        "matrixstack.engine, matrixstack.engine.http, matrixstack.engine.external",
    ],
)
def test_import_does_not_pull_torch(modules):
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_engine_names_resolve_lazily():
    import matrixstack.engine as engine
    from matrixstack.engine.loading import load_model
    from matrixstack.engine.model import MoETransformer

    assert engine.load_model is load_model
    assert engine.MoETransformer is MoETransformer
    assert set(engine.__all__) <= set(dir(engine))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        engine.nope  # noqa: B018
