#!/usr/bin/env python3
"""Watch Greyproxy's pending queue from the bus, and optionally allow the first request.

A standalone program, as a third party would write it: it needs only pyzmq and orjson
(`pip install pyzmq orjson`), talks to the bus directly (see docs/events.md) and to the REST
API with urllib.

    # with the stack running (greyproxy serve), as the same user:
    python examples/pending_watcher.py
    python examples/pending_watcher.py --allow-first --duration 1h
    python examples/pending_watcher.py --bus ipc:///path/to/run/bus-sub.sock --api http://127.0.0.1:43080

`greyproxy config` prints the endpoints (resolved.bus.sub, the API address) when they are not
the defaults. Then make a client wait on an unknown destination, e.g.
`curl -x http://myagent@127.0.0.1:43051 http://example.com/`: the watcher prints it, and with
--allow-first allows it (scope and duration as for POST /api/pending/:id/allow), which lets
the held curl through. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import zmq

TOPICS = ("pending_request.created", "pending_request.updated", "pending_request.allowed",
          "pending_request.dismissed")


def default_bus() -> str:
    """The default subscriber endpoint: <data dir>/run/bus-sub.sock (same rules as greyproxy)."""
    if os.environ.get("GREYPROXY_DATA_HOME"):
        data = Path(os.environ["GREYPROXY_DATA_HOME"]).expanduser()
    elif os.environ.get("XDG_DATA_HOME"):
        data = Path(os.environ["XDG_DATA_HOME"]).expanduser() / "greyproxy"
    elif sys.platform == "darwin":
        data = Path.home() / "Library" / "Application Support" / "greyproxy"
    else:
        data = Path.home() / ".local" / "share" / "greyproxy"
    return f"ipc://{data / 'run' / 'bus-sub.sock'}"


def allow(api: str, pending_id: int, scope: str, duration: str) -> dict:
    """POST /api/pending/:id/allow; the answer holds the rule that was created (or reused)."""
    body = orjson.dumps({"scope": scope, "duration": duration})
    req = urllib.request.Request(f"{api.rstrip('/')}/api/pending/{pending_id}/allow", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return orjson.loads(resp.read())


def describe(entry: dict) -> str:
    host = entry.get("resolved_hostname") or entry.get("destination_host")
    return (f"#{entry.get('id')} {entry.get('container_name')} -> {host}:{entry.get('destination_port')}"
            f" (attempts {entry.get('attempt_count')}, waiting {entry.get('waiting')})")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the loop the way Ctrl-C does


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bus", default=default_bus(), help="the bus subscriber endpoint (bus.sub)")
    p.add_argument("--api", default="http://127.0.0.1:43080", help="the API base URL (with any path prefix)")
    p.add_argument("--allow-first", action="store_true", help="allow the first new pending request")
    p.add_argument("--scope", default="exact", help="rule scope for --allow-first (default exact)")
    p.add_argument("--duration", default="once", help="rule duration for --allow-first (default once)")
    args = p.parse_args()

    signal.signal(signal.SIGTERM, _interrupt)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(args.bus)
    for topic in TOPICS:
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    print(f"watching {args.bus}", flush=True)
    allowed_one = False
    try:
        while True:
            topic_b, payload = sub.recv_multipart()
            msg = orjson.loads(payload)
            topic, data = msg["type"], msg["data"]
            if topic != topic_b.decode():
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(msg.get("ts", time.time())))
            if topic in ("pending_request.created", "pending_request.updated"):
                print(f"{stamp} {topic.split('.')[1]:8} {describe(data)}", flush=True)
                if args.allow_first and not allowed_one and topic == "pending_request.created":
                    allowed_one = True
                    try:
                        rule = allow(args.api, data["id"], args.scope, args.duration)["rule"]
                    except urllib.error.HTTPError as exc:
                        print(f"allow #{data['id']} failed: {exc.code} {exc.read().decode(errors='replace')}",
                              file=sys.stderr, flush=True)
                    else:
                        print(f"{stamp} allowed  #{data['id']} with rule #{rule['id']} ({rule['container_pattern']}"
                              f" -> {rule['destination_pattern']}:{rule['port_pattern']}, "
                              f"expires {rule['expires_at'] or 'never'})", flush=True)
            else:
                verb = "allowed" if topic.endswith("allowed") else "dismissed"
                print(f"{stamp} {verb:8} #{data.get('pending_id')}", flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close()


if __name__ == "__main__":
    sys.exit(main())
