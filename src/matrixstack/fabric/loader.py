"""Find a fabric by built-in name, by YAML path, or `local` (this machine)."""

from __future__ import annotations

from matrixstack.fabric.local import detect_local_fabric
from matrixstack.fabric.spec import FabricSpec
from matrixstack.specio import catalog_names, load_spec

CATALOG_PACKAGE = "matrixstack.fabric.catalog"
LOCAL = "local"


def fabric_names() -> list[str]:
    """Return the names of the built-in fabrics, `local` included."""
    return sorted([*catalog_names(CATALOG_PACKAGE), LOCAL])


def load_fabric(name_or_path: str) -> FabricSpec:
    """Return the fabric with this built-in name or at this YAML path; raises a UserError when it can't."""
    if name_or_path == LOCAL:
        return detect_local_fabric()
    return load_spec(FabricSpec, name_or_path, CATALOG_PACKAGE, "fabric", other_names=(LOCAL,))
