"""Find an arch by built-in name or by YAML path."""

from __future__ import annotations

from matrixstack.arch.spec import Arch
from matrixstack.specio import catalog_names, load_spec

CATALOG_PACKAGE = "matrixstack.arch.catalog"


def arch_names() -> list[str]:
    """Return the sorted names of the built-in archs."""
    return catalog_names(CATALOG_PACKAGE)


def load_arch(name_or_path: str) -> Arch:
    """Return the arch with this built-in name or at this YAML path; raises a UserError when it can't."""
    return load_spec(Arch, name_or_path, CATALOG_PACKAGE, "arch")
