"""The unified portal: the catalog (L0 / L1 / L2 lineage), tenants, API keys, usage, and the OpenAI-compatible API.

`PortalService` holds the state; `EntrySpec` / `BackendSpec` describe catalog entries; `Resolved` is an entry's
chain merged into the settings applied to each request.
"""

from matrixstack.portal.resolve import Resolved
from matrixstack.portal.service import PortalService
from matrixstack.portal.spec import BackendSpec, EntrySpec

__all__ = ["BackendSpec", "EntrySpec", "PortalService", "Resolved"]
