"""Open the site a shape names: `open_site` returns a `LocalSite` or a `RaySite` (both `stack.site.Site`s).

The factory lives apart from `stack.site` (the protocol and the launch types), which the concrete sites import, so
no import cycle joins them. Each site's module is imported when it is opened (the ray site imports Ray).
"""

from __future__ import annotations

from matrixstack.errors import UserError
from matrixstack.stack.site import Site
from matrixstack.stack.spec import SiteShape


def open_site(site: SiteShape) -> Site:
    """Return the site `site` names: a LocalSite or a RaySite; UserError for k8s (rendered, not run)."""
    if site.kind == "local":
        from matrixstack.stack.local_site import LocalSite

        return LocalSite(site)
    if site.kind == "ray":
        from matrixstack.stack.ray_site import RaySite

        return RaySite(site)
    raise UserError(
        "a k8s site is not run from here: render its manifests with `matrixstack stack render k8s SHAPE --out DIR` "
        "and apply them with kubectl; `matrixstack up` runs local and ray sites"
    )
