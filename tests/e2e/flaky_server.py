"""A deliberately unreliable stdio MCP server for toolwarden's end-to-end tests.

Run it with the e2e venv's interpreter (scripts/install-components builds it):

    tests/e2e/.venv/bin/python tests/e2e/flaky_server.py
    tests/e2e/.venv/bin/python tests/e2e/flaky_server.py --http PORT   # Streamable HTTP at http://127.0.0.1:PORT/mcp

Tools:
  flaky_search {query: str}   fails (result with isError: true) for the first
                              N calls, then succeeds; N comes from the
                              environment variable FLAKY_FAILURES (default 2).
  slow {seconds: float}       sleeps that long, then answers; a call cancelled
                              by the client (notifications/cancelled) is counted
                              as `slow_cancelled`.
  stats {}                    how many times each tool was called so far
                              (structured content), to check what reached the
                              server through retries, caches, circuit breakers.

Counters live in the process: every new process starts from zero.
Uses the mcp 2.x SDK (`MCPServer`, formerly `FastMCP`), pinned in requirements.txt.
"""

from __future__ import annotations

import os
import sys

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

FAILURES = int(os.environ.get("FLAKY_FAILURES", "2"))

server = MCPServer(name="toolwarden-flaky", version="0.1.0", log_level="WARNING")

_calls = {"flaky_search": 0, "slow": 0, "slow_cancelled": 0}


@server.tool(description="Search that fails for the first FLAKY_FAILURES calls, then succeeds.")
def flaky_search(query: str) -> str:
    _calls["flaky_search"] += 1
    n = _calls["flaky_search"]
    if n <= FAILURES:
        raise ToolError(f"flaky_search: simulated failure {n} of {FAILURES}")
    return f"results for {query!r} (call {n})"


@server.tool(description="Sleep for the given number of seconds, then answer.")
async def slow(seconds: float) -> str:
    _calls["slow"] += 1
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        _calls["slow_cancelled"] += 1
        raise
    return f"slept {seconds}s"


@server.tool(description="How many times each tool has been called in this process.")
def stats() -> dict[str, int]:
    return dict(_calls)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http" and sys.argv[2].isdigit():
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    elif len(sys.argv) == 1:
        server.run("stdio")
    else:
        sys.exit("usage: flaky_server.py [--http PORT]  (configure with FLAKY_FAILURES)")
