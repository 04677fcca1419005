"""The unified portal: the catalog (L0 / L1 / L2 lineage), tenants, API keys, usage, and the OpenAI-compatible API.

The state lives in one module per concept (`key_service`, `catalog_service`, `deployment_service`,
`usage_service`; tenants are the matrix layer's `tenants`), run in the caller's unit of work (`matrix.database`);
`EntrySpec` / `BackendSpec` describe catalog entries; `Resolved` is an entry's chain merged into the settings
applied to each request.
"""

from matrixstack.portal.resolve import Resolved
from matrixstack.portal.spec import BackendSpec, EntrySpec

__all__ = ["BackendSpec", "EntrySpec", "Resolved"]
