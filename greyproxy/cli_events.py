"""`greyproxy events`: tail the bus, one event a line (what /ws clients see, plus internal topics on request)."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any, TextIO

import orjson
import zmq

from bus import message, topics

from .cli import EXTRA_COMMANDS, _add_config_args, _load
from .config import ConfigError

POLL_MS = 200  # how often the loop looks at the stop flag while the bus is quiet


class TypeFilter:
    """Exact topics and `family.*` patterns; `*` is every topic, internal ones included."""

    def __init__(self, patterns: Iterable[str] | None) -> None:
        self.exact: set[str] = set()
        self.families: set[str] = set()
        for raw in patterns or ():
            for p in filter(None, (s.strip() for s in raw.split(","))):
                if p == "*":
                    self.families.add("")
                elif p.endswith(".*"):
                    self.families.add(p[:-1])
                else:
                    self.exact.add(p)
        if not self.exact and not self.families:
            self.exact = set(topics.PUBLIC)  # by default what /ws shows; heartbeats would drown it

    def prefixes(self) -> list[str]:
        """SUB prefixes: zmq filters by prefix, so exact topics are checked again in matches()."""
        return sorted(self.families | self.exact)

    def matches(self, topic: str) -> bool:
        return topic in self.exact or any(topic.startswith(f) for f in self.families)


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return orjson.dumps(v).decode() if (not v or any(c.isspace() or c in '"=' for c in v)) else v
    if isinstance(v, (int, float)):
        return str(v)
    return orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS).decode()


def human_line(msg: dict[str, Any]) -> str:
    """`HH:MM:SS type key=value ...` (local time of the event)."""
    ts = msg.get("ts")
    clock = time.strftime("%H:%M:%S", time.localtime(ts if isinstance(ts, (int, float)) else time.time()))
    data = msg.get("data")
    if isinstance(data, dict):
        fields = " ".join(f"{k}={_value(v)}" for k, v in data.items())
    else:
        fields = f"data={_value(data)}"
    return f"{clock} {msg.get('type')} {fields}".rstrip()


def configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print bus events as they happen, one a line (Ctrl-C to stop). By default every public "
        "event (those /ws forwards); --type narrows, and can name internal topics too."
    )
    _add_config_args(p)
    p.add_argument(
        "-t",
        "--type",
        action="append",
        metavar="T",
        help="an event type (pending_request.created), a family (pending_request.*) or * for "
        "every topic; repeat or comma-separate for several",
    )
    p.add_argument("--json", action="store_true", help="print each full bus message as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    filt = TypeFilter(args.type)
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    from bus import curve

    curve.configure(cfg.keys_dir, cfg.bus["serverKey"])
    curve.secure(sock, cfg.bus["sub"], server=False)
    try:
        sock.connect(cfg.bus["sub"])
    except zmq.ZMQError as exc:
        sock.close()
        ctx.term()
        raise ConfigError(f"cannot connect to the bus at {cfg.bus['sub']}: {exc}") from None
    for prefix in filt.prefixes():
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    print(f"greyproxy events: listening on {cfg.bus['sub']} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    hint = bus_hint(cfg.bus["sub"])
    if hint:
        print(f"greyproxy events: {hint}", file=sys.stderr, flush=True)
    try:
        return _tail(sock, filt, args.json, sys.stdout, lambda: stop)
    finally:
        sock.close()
        ctx.term()


def bus_hint(endpoint: str) -> str | None:
    """Why no event may come, said at once rather than left to a silent wait; None when the bus
    is there. ipc://: no socket accepts at the file. tcp://: the bus refused this host's CURVE key,
    bus.serverKey is wrong, or nothing listens (bus/curve.py's diagnose: a CURVE handshake, which
    an allowed key completes without a line in the bus's log)."""
    if endpoint.startswith("tcp://"):
        from bus import curve

        return curve.diagnose(endpoint, timeout=2.0, kind=zmq.SUB)
    if not bus_listening(endpoint):
        return "no bus listens there yet: is Greyproxy running? (its events appear once it starts)"
    return None


def bus_listening(endpoint: str) -> bool:
    """Whether something accepts connections on an ipc:// endpoint (its socket file may be missing, or
    left behind by a stack that stopped); a tcp:// one is taken as listening (a bare TCP connect to
    a CURVE socket would only add noise to the bus's log)."""
    import socket

    if not endpoint.startswith("ipc://"):
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(endpoint[len("ipc://") :])
        except OSError:
            return False
    return True


def _tail(sock: zmq.Socket, filt: TypeFilter, as_json: bool, out: TextIO, stopped: Any) -> int:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stopped():
        try:
            if not poller.poll(POLL_MS):
                continue
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            continue
        except zmq.ZMQError as exc:
            if exc.errno == errno.EINTR:  # a signal arrived; the loop checks the flag
                continue
            raise
        try:
            msg = message.decode(frames)
        except message.BadMessage:
            continue  # not ours to print
        topic = msg.get("type")
        if not isinstance(topic, str) or not filt.matches(topic):
            continue
        line = frames[1].decode("utf-8", "replace") if as_json else human_line(msg)
        try:
            out.write(line + "\n")
            out.flush()  # a pipe reader (grep, a test) sees each event at once
        except BrokenPipeError:
            _quiet_stdout()
            return 0
    return 0


def _quiet_stdout() -> None:
    # The reader went away (`| head`): stop without Python's "Exception ignored" noise at exit.
    import os

    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


EXTRA_COMMANDS["events"] = (configure, run, "print bus events as they happen")
