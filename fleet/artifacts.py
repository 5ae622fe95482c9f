"""The artifact server: catalog variants over HTTP, resumable, with signed manifests.

``GET /v1/artifacts`` lists every variant's manifest; ``GET
/v1/artifacts/{name}/manifest`` gives one (name, backend, sha256, size, URL
and the ed25519 signature over the decisive fields); ``GET
/v1/artifacts/{name}`` streams the file and honours ``Range`` so an edge
device on a poor link resumes instead of starting over. Only files named in
the catalog are served: a path is never taken from the request. With
``[http.auth]`` every route needs a device credential (``fleet/auth.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from quantfleet.agent.update.signing import PrivateKey, sign
from quantfleet.models.catalog import Catalog, CatalogError, VariantEntry

from .auth import HttpAuth

log = logging.getLogger(__name__)


def manifest(entry: VariantEntry, key: PrivateKey, base_url: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "variant": entry.name,
        "backend": entry.backend,
        "sha256": entry.sha256,
        "size_bytes": entry.size_bytes,
    }
    return {
        **fields,
        "precision": entry.precision.label,
        "url": f"{base_url.rstrip('/')}/v1/artifacts/{entry.name}",
        "signature": sign(key, fields),
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "status": status}}, status_code=status)


def create_artifact_app(models_dir: Path, key: PrivateKey, base_url: str,
                        auth: HttpAuth | None = None) -> Starlette:
    """A Starlette app serving ``models_dir``'s catalog; the catalog is re-read per request
    so a ladder rebuilt while the fleet runs is served without a restart. With ``auth``
    enabled every route needs a device credential (the ``artifacts`` role)."""
    guard = (auth or HttpAuth(None)).guard

    def _catalog() -> Catalog:
        return Catalog(models_dir)

    def _entry(name: str) -> VariantEntry | JSONResponse:
        try:
            catalog = _catalog()
        except CatalogError as exc:
            log.error("catalog unreadable: %s", exc)
            return _error(503, "the catalog is unreadable on the fleet")
        entry = catalog.doc.variants.get(name)
        if entry is None:
            return _error(404, f"no variant {name!r}")
        return entry

    async def list_artifacts(request: Request) -> Response:
        try:
            catalog = _catalog()
        except CatalogError:
            return _error(503, "the catalog is unreadable on the fleet")
        return JSONResponse({"artifacts": [manifest(v, key, base_url) for v in catalog.variants]})

    async def get_manifest(request: Request) -> Response:
        entry = _entry(request.path_params["name"])
        if isinstance(entry, JSONResponse):
            return entry
        return JSONResponse(manifest(entry, key, base_url))

    async def get_file(request: Request) -> Response:
        entry = _entry(request.path_params["name"])
        if isinstance(entry, JSONResponse):
            return entry
        path = entry.path(models_dir)
        if not path.is_file():
            return _error(404, f"variant {entry.name!r} is catalogued but its file is missing")
        return FileResponse(path, media_type="application/octet-stream",
                            headers={"X-Artifact-Sha256": entry.sha256})

    return Starlette(routes=[
        Route("/v1/artifacts", guard("artifacts", list_artifacts)),
        Route("/v1/artifacts/{name}/manifest", guard("artifacts", get_manifest)),
        Route("/v1/artifacts/{name}", guard("artifacts", get_file), methods=["GET", "HEAD"]),
    ])
