#!/usr/bin/env python3
"""A minimal MCP client on one kept-alive HTTP/1.1 connection (the standard
library only): initialize, notifications/initialized, then N tools/call of
`echo`, each with a message never sent before (checked in the answer).
Prints the p50 latency. Used by `instructions` to drive a proxy under
callgrind; protocol version 2025-06-18, as the peer harness's raw client.

usage: keepalive_client.py PORT N [PATH] [TOOL]
"""
import http.client
import json
import sys
import time

port, n = int(sys.argv[1]), int(sys.argv[2])
path = sys.argv[3] if len(sys.argv) > 3 else "/mcp"
tool = sys.argv[4] if len(sys.argv) > 4 else "echo"
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def post(body, session=None):
    headers = dict(HEADERS)
    if session:
        headers["Mcp-Session-Id"] = session
        headers["MCP-Protocol-Version"] = "2025-06-18"
    conn.request("POST", path, json.dumps(body), headers)
    response = conn.getresponse()
    return response, response.read()


response, _ = post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "keepalive-client", "version": "1"}}})
session = response.getheader("Mcp-Session-Id")
post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
latencies = []
for i in range(n):
    start = time.perf_counter()
    _, body = post({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                    "params": {"name": tool, "arguments": {"message": f"m{i}"}}}, session)
    latencies.append(time.perf_counter() - start)
    if f"m{i}".encode() not in body:
        sys.exit(f"call {i}: unexpected answer {body[:200]!r}")
latencies.sort()
print(f"p50 {latencies[len(latencies) // 2] * 1e6:.0f} us")
