"""A host's client through the proxy: the official Python MCP SDK's
high-level `Client`, in its default mode (`auto`: `server/discover` first,
the `initialize` handshake when the server's versions call for it), in
front of server-everything. Run by `crates/proxy/tests/python_sdk.rs`.

    python_sdk_client.py stdio TOOLWARDEN_BIN SERVER_EVERYTHING
    python_sdk_client.py http URL

Prints one JSON line: the version negotiated, whether the server's
sampling and elicitation requests reached the client (through the tools
that trigger them), how many log messages arrived, and what the SDK logged
at warning level or above (a failed session termination, say).
"""

import json
import logging
import sys

import anyio
from mcp import Client, types
from mcp.client.stdio import StdioServerParameters


async def sampling(_context, _params):
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text="sampled by the test"),
        model="test",
    )


async def elicitation(_context, _params):
    return types.ElicitResult(action="accept", content={"name": "Ada"})


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


async def main():
    warnings = Warnings()
    logging.getLogger().addHandler(warnings)
    if sys.argv[1] == "stdio":
        target = StdioServerParameters(command=sys.argv[2], args=["run", "--", sys.argv[3]])
    else:
        target = sys.argv[2]
    logs = []

    async def on_log(params):
        logs.append(params)

    report = {}
    async with Client(
        target,
        sampling_callback=sampling,
        elicitation_callback=elicitation,
        logging_callback=on_log,
        log_level="debug",
        read_timeout_seconds=30,
    ) as client:
        report["version"] = client.protocol_version
        sampled = await client.call_tool(
            "trigger-sampling-request", {"prompt": "hi", "maxTokens": 10}
        )
        report["sampling_error"] = sampled.is_error
        report["sampling_text"] = " ".join(
            c.text for c in sampled.content if isinstance(c, types.TextContent)
        )[:300]
        elicited = await client.call_tool("trigger-elicitation-request", {})
        report["elicitation_error"] = elicited.is_error
        await client.call_tool("toggle-simulated-logging", {})
        with anyio.move_on_after(15):
            while not logs:
                await anyio.sleep(0.1)
        report["logs"] = len(logs)
    report["warnings"] = warnings.messages
    print(json.dumps(report), flush=True)


anyio.run(main)
