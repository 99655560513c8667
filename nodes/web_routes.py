"""`GET /klein_lora/history`: the recorded events of the current/last run, for the page to replay on load.

Registered on ComfyUI's route table only when a server runs (PromptServer.instance exists); in library
use (tests, scripts) there is nothing to register.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from . import progress_log

ROUTE = "/klein_lora/history"
_installed: set[str] = set()


def prompt_server():
    """ComfyUI's running server, or None when the pack is used as a library."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def install_once(name: str, install: Callable[[object], None]) -> bool:
    """Run `install(server)` the first time it is asked for `name`; False when no server runs (library use)."""
    if name in _installed:
        return True
    server = prompt_server()
    if server is None:
        return False
    install(server)
    _installed.add(name)
    logging.debug("Klein LoRA: %s registered", name)
    return True


def _add_history_route(server) -> None:
    from aiohttp import web

    @server.routes.get(ROUTE)
    async def history(request: web.Request) -> web.Response:
        return web.json_response({"events": progress_log.events(request.query.get("node"))})


def register() -> bool:
    """Add the route once; False when no server runs."""
    return install_once(ROUTE, _add_history_route)
