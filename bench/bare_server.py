"""The ``ceiling_http`` server: a bare aiohttp handler that reads the body and answers 200.

Same framework, event loop (uvloop when installed), access-log setting and answer size as the relay, so
that ``ingest / ceiling_http`` is what durable ingest costs on top of a no-op handler.

    python bench/bare_server.py PORT
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

ANSWER = b'{"status": "accepted", "accepted": 1, "duplicates": 0}'


async def handler(request: web.Request) -> web.Response:
    """Read the whole body, answer 200."""
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """What the harness polls before it sends load."""
    return web.Response(text="ok")


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/parley/webhook", handler)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(int(sys.argv[1])))
    else:
        uvloop.run(serve(int(sys.argv[1])))
