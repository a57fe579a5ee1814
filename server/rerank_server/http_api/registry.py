"""The HTTP API flavours served, and everything derived from their declared routes.

A flavour is a module with an `api = HttpApi(...)` whose routes are declared with `@api.post` / `@api.get`;
registering it here is all the rest needs: the app includes its router, the gate knows its paths (metrics
labels, which paths are open) and its errors take its shape.
"""

from __future__ import annotations

from rerank_server.http_api import cohere, nim, tei, vllm
from rerank_server.http_api.common import HttpApi, Route
from rerank_server.http_api.errors import COHERE, ErrorShape

APIS: tuple[HttpApi, ...] = (cohere.api, tei.api, nim.api, vllm.api)
# Errors on a path no flavour declares (a 404, say) take Cohere's shape, the most common client's.
DEFAULT_SHAPE = COHERE

ROUTES: tuple[Route, ...] = tuple(route for api in APIS for route in api.routes)
# Request fields, of any API, that are lists of objects.
OBJECT_LISTS = frozenset(name for api in APIS for name in api.object_lists)
# Paths served without a token and while draining: probes.
OPEN_PATHS = frozenset(route.path for route in ROUTES if route.open)
# The routes that rank documents (each API's rerank call).
RANKING_PATHS = tuple(route.path for route in ROUTES if route.ranks)
# Longest first, so that a path takes the shape of the most specific declared route it is under.
_BY_LENGTH = sorted(((route.path, route.shape) for route in ROUTES), key=lambda item: -len(item[0]))


def _check_unique() -> None:
    seen: set[tuple[str, str]] = set()
    for route in ROUTES:
        if (route.method, route.path) in seen:
            raise RuntimeError(f"{route.method} {route.path} is declared by two HTTP APIs")
        seen.add((route.method, route.path))


_check_unique()


def shape_for(path: str) -> ErrorShape:
    """The error shape of the route at `path`, or of the declared route it lies under."""
    for prefix, shape in _BY_LENGTH:
        if path == prefix or path.startswith(prefix + "/"):
            return shape
    return DEFAULT_SHAPE
