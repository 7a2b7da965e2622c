"""The broker: one XSUB (publishers connect) forwarded to one XPUB (subscribers connect)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import zmq

from . import curve, message, topics

log = logging.getLogger("greyproxy.bus")

# Past this many queued messages per subscriber, XPUB drops for that subscriber only.
SUB_HWM = 100_000


def run_broker(pub_endpoint: str, sub_endpoint: str, heartbeat_interval: float = 1.0) -> None:
    """Run the forwarder until SIGTERM/SIGINT; publish the broker's own heartbeat."""
    ctx = zmq.Context.instance()
    xsub = ctx.socket(zmq.XSUB)
    xsub.setsockopt(zmq.RCVHWM, SUB_HWM)
    curve.secure(xsub, pub_endpoint, server=True)
    xsub.bind(pub_endpoint)
    # The subscribers' (un)subscriptions travel the other way, XPUB -> XSUB -> every publisher:
    # XPUB (not verbose) passes a prefix's first subscription and last unsubscription (a
    # subscriber that goes away unsubscribes from all it had), and XSUB sends the ones current
    # to each publisher that connects. bus.pubsub.Publisher relies on this to skip events
    # nobody subscribes to (XPUB_VERBOSE here would leave them subscriptions that are gone).
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.SNDHWM, SUB_HWM)
    curve.secure(xpub, sub_endpoint, server=True)
    xpub.bind(sub_endpoint)
    for ep in (pub_endpoint, sub_endpoint):
        if ep.startswith("ipc://"):
            try:
                os.chmod(ep[len("ipc://") :], 0o600)
            except OSError:
                pass

    # The forwarder releases the GIL in C; it runs in a thread so the main thread can take signals.
    # Steerable: told to end (a key revoked), it gives the sockets back to this thread, which binds
    # them again (bus/curve.py: an open connection is never checked again) and starts a new one.
    control_ep = f"inproc://bus-forwarder-control-{os.getpid()}"

    def forward() -> None:
        control = ctx.socket(zmq.PAIR)
        control.bind(control_ep)
        try:
            zmq.proxy_steerable(xsub, xpub, None, control)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:  # pragma: no cover - only at shutdown
            log.debug("forwarder stopped: %s", exc)
        finally:
            control.close(linger=0)

    def start_forwarder() -> threading.Thread:
        thread = threading.Thread(target=forward, name="bus-forwarder", daemon=True)
        thread.start()
        return thread

    forwarder = start_forwarder()

    def rebind_after_revocation() -> threading.Thread:
        steer = ctx.socket(zmq.PAIR)
        steer.setsockopt(zmq.LINGER, 0)
        steer.connect(control_ep)
        steer.send(b"TERMINATE")
        forwarder.join(5)
        steer.close()
        for sock, ep in ((xsub, pub_endpoint), (xpub, sub_endpoint)):
            if ep.startswith("tcp://"):
                curve.rebind_blocking(sock, ep)
                log.warning("a key was revoked: the connections to %s ended; authorized peers connect again", ep)
        return start_forwarder()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    hb = ctx.socket(zmq.PUB)
    hb.setsockopt(zmq.LINGER, 0)
    curve.secure(hb, pub_endpoint, server=False)
    hb.connect(pub_endpoint)
    started = time.time()
    host = socket.gethostname()
    seq = 0
    log.info("bus broker up: publishers -> %s, subscribers <- %s", pub_endpoint, sub_endpoint)

    def beat(**extra: object) -> None:
        nonlocal seq
        seq += 1
        data = {
            "service": "bus",
            "pid": os.getpid(),
            "host": host,
            "started_at": started,
            "uptime": time.time() - started,
            "stats": {},
            **extra,
        }
        try:
            hb.send_multipart(message.encode(topics.SERVICE_HEARTBEAT, data, "bus", seq), zmq.NOBLOCK)
        except zmq.Again:
            pass

    while not stop.wait(heartbeat_interval):
        beat()
        if curve.configured() and curve.revoked():
            forwarder = rebind_after_revocation()
    log.info("bus broker stopping")
    # A last heartbeat, as every service sends on a clean stop (docs/events.md): the API shows the
    # bus down at once, and does not count the next one as a restart after a crash. The forwarder
    # still runs: a moment for it to pass the message on.
    beat(ready=False, stopping=True)
    time.sleep(0.1)
    os._exit(0)  # the forwarder thread holds sockets; a clean exit would block on them
