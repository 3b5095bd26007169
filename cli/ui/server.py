"""``tlreg ui``: the read-only lineage browser, served by aiohttp (already installed with
``ray[default]``: its dashboard's server).

Read-only by construction: every request whose method is not GET or HEAD gets 405 before
any handler runs, and the handlers only call the registry's read methods. Assets ship in the
package and are served from an allow-list (anything else, ``..`` included, is 404); no page
loads anything from another origin (a Content-Security-Policy says so to the browser).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from typing import Any

from aiohttp import web

from tlreg.cli.ui import pages
from tlreg.registry import Registry
from tlreg.registry.errors import RefNotFound, RegistryError
from tlreg.storage_backends import Store

ALLOWED_METHODS = ("GET", "HEAD")
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript"}
"""The only files under /static/, with their content types."""
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'"
REGISTRY_KEY = web.AppKey("registry", Registry)
MANIFESTS_KEY = web.AppKey("manifests", pages.ManifestCache)
STORE_KEY = web.AppKey("store", Store)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def read_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """405 for every method but GET and HEAD; security headers on every answer."""
    if request.method not in ALLOWED_METHODS:
        response: web.StreamResponse = web.Response(
            status=405,
            text="405: tlreg ui is read-only (GET and HEAD only)\n",
            headers={"Allow": ", ".join(ALLOWED_METHODS)},
        )
    else:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            if e.status == 405:
                e.headers["Allow"] = ", ".join(ALLOWED_METHODS)
            response = e
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _not_found(message: str) -> web.Response:
    return _html(pages.render("error.html", title="Not found", message=message), status=404)


def _bad_request(message: str) -> web.Response:
    return _html(pages.render("error.html", title="Bad request", message=message), status=400)


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # The registry and store are synchronous: keep the event loop free for other requests.
    return await asyncio.to_thread(fn, *args, **kwargs)


def _cursor(value: str | None) -> tuple[datetime, str] | None:
    if not value:
        return None
    when, _, cid = value.partition("|")
    return datetime.fromisoformat(when), cid


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/lineage")


async def lineage(request: web.Request) -> web.StreamResponse:
    q = request.query
    registry = request.app[REGISTRY_KEY]
    try:
        limit = int(q.get("limit", pages.PAGE_SIZE))
        before = _cursor(q.get("before"))
    except ValueError:
        return _bad_request("limit is a number and before a cursor from an 'older' link")
    if not 1 <= limit <= pages.MAX_PAGE_SIZE:
        return _bad_request(f"limit is between 1 and {pages.MAX_PAGE_SIZE}")
    branches = q.getall("branch", []) or None
    metric = q.get("metric") or None
    text = await _call(
        pages.lineage_page,
        registry,
        limit=limit,
        before=before,
        branches=branches,
        metric=metric,
        collapse=q.get("collapse", "1") != "0",
    )
    return _html(text)


async def checkpoint(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["ref"]
    against = request.query.get("against") or None
    try:
        text = await _call(
            pages.checkpoint_page,
            request.app[REGISTRY_KEY],
            request.app[MANIFESTS_KEY],
            ref,
            against,
        )
    except (RefNotFound, LookupError) as e:
        return _not_found(str(e).splitlines()[0])
    return _html(text)


async def runs(request: web.Request) -> web.StreamResponse:
    return _html(await _call(pages.runs_page, request.app[REGISTRY_KEY]))


def _target(request: web.Request) -> float | None:
    raw = request.query.get("target", "").strip()
    return float(raw) if raw else None


async def compare(request: web.Request) -> web.StreamResponse:
    try:
        target = _target(request)
    except ValueError:
        return _bad_request("target is a number, e.g. 0.95")
    try:
        text = await _call(
            pages.compare_page,
            request.app[REGISTRY_KEY],
            request.app[STORE_KEY],
            request.query.getall("ref", []),
            request.query.get("metric") or None,
            target,
        )
    except LookupError as e:
        return _not_found(str(e).splitlines()[0])
    return _html(text)


async def compare_svg(request: web.Request) -> web.StreamResponse:
    refs = request.query.getall("ref", [])
    metric = request.query.get("metric")
    if not refs or not metric:
        return _bad_request("pass ref=BRANCH (one or more) and metric=NAME")
    try:
        target = _target(request)
        svg = await _call(pages.compare_chart, request.app[REGISTRY_KEY], refs, metric, target)
    except ValueError:
        return _bad_request("target is a number, e.g. 0.95")
    except LookupError as e:
        return _not_found(str(e).splitlines()[0])
    return web.Response(
        text=svg,
        content_type="image/svg+xml",
        charset="utf-8",
        headers={"Content-Security-Policy": SVG_CSP},
    )


async def changes(request: web.Request) -> web.StreamResponse:
    """{id: what changed against the first parent (or null)} for up to 200 ids."""
    ids = request.query.getall("id", [])[:200]
    registry = request.app[REGISTRY_KEY]

    def count() -> dict[str, str | None]:
        records = []
        for cid in ids:
            try:
                records.append(registry.get(cid))
            except (RegistryError, LookupError):
                continue
        return pages.parent_changes(registry, request.app[MANIFESTS_KEY], records)

    return web.Response(text=json.dumps(await _call(count)), content_type="application/json")


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    kind = STATIC.get(name)
    if kind is None:
        return _not_found("no such file")
    body = resources.files("tlreg.cli.ui").joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=kind, charset="utf-8")


async def _not_found_page(request: web.Request) -> web.StreamResponse:
    return _not_found(f"nothing at {request.path}")


def make_app(registry: Registry, store: Store) -> web.Application:
    """The aiohttp application over an open registry and store (neither is ever written)."""
    app = web.Application(middlewares=[read_only])
    app[REGISTRY_KEY] = registry
    app[STORE_KEY] = store
    app[MANIFESTS_KEY] = pages.ManifestCache(store)
    # add_get also answers HEAD.
    app.router.add_get("/", index)
    app.router.add_get("/lineage", lineage)
    app.router.add_get("/checkpoint/{ref}", checkpoint)
    app.router.add_get("/compare", compare)
    app.router.add_get("/compare.svg", compare_svg)
    app.router.add_get("/runs", runs)
    app.router.add_get("/api/changes", changes)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/{tail:.*}", _not_found_page)
    return app


def serve(
    registry: Registry,
    store: Store,
    *,
    host: str,
    port: int,
    print_fn: Callable[[str], None] = print,
) -> None:
    """Serve until interrupted (Ctrl-C); ``port`` 0 picks a free port. Prints the URL."""
    try:
        asyncio.run(_serve(make_app(registry, store), host, port, print_fn))
    except KeyboardInterrupt:
        pass


async def _serve(
    app: web.Application, host: str, port: int, print_fn: Callable[[str], None]
) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        print_fn(f"tlreg ui on http://{shown}:{bound}/ (read-only; Ctrl-C stops)")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
