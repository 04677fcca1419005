"""Find an arch by built-in name, by the name of a registered model (`arch.registry`) or by YAML path."""

from __future__ import annotations

from matrixstack.arch.registry import model_names, registered_arch_file
from matrixstack.arch.spec import Arch
from matrixstack.errors import UnknownNameError
from matrixstack.specio import catalog_names, load_spec

CATALOG_PACKAGE = "matrixstack.arch.catalog"


def arch_names() -> list[str]:
    """Return the sorted names of the built-in archs."""
    return catalog_names(CATALOG_PACKAGE)


def load_arch(name_or_path: str) -> Arch:
    """Return the arch with this built-in name, of this registered model or at this YAML path; raises a UserError
    when it can't."""
    registered = None if name_or_path in arch_names() else registered_arch_file(name_or_path)
    if registered is not None:
        return load_spec(Arch, str(registered), CATALOG_PACKAGE, "arch")
    try:
        return load_spec(Arch, name_or_path, CATALOG_PACKAGE, "arch")
    except UnknownNameError as exc:
        names = ", ".join(model_names())
        raise UnknownNameError(f"{exc}; registered models: {names}") if names else exc from None
