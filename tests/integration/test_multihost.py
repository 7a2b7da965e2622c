"""A proxy on "another host" (SPEC §15): its own data dir, joined to a central bus, recorder and API
over tcp:// with CURVE keys, all on loopback.

The central stack runs its bus, journal and recorder control on tcp://; the second proxy has
its own data dir and keys, rulesFrom: recorder, and a tcp:// control endpoint the API learns from
its heartbeat. Its traffic must be judged by the central rules and recorded centrally; a peer
whose key the central host does not know is refused, and the refusal logged.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.reqrep import ServiceUnavailable, call_sync
from conftest import (
    PYTHON,
    REPO,
    PathHandler,
    Stack,
    add_rule,
    free_ports,
    log_entries,
    plain_origin,
    service_env,
    short_tmpdir,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

ORIGIN_HOST = "127.0.0.2"


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(PathHandler, ORIGIN_HOST) as port:
        yield port


def keys(data_dir: Path, *args: str) -> str:
    r = subprocess.run(
        [PYTHON, "-m", "greyproxy", "keys", *args],
        env=service_env(data_dir),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


class Remote:
    """`greyproxy run proxy -C FILE` with its own data dir, against the central stack's bus."""

    def __init__(self, stack: Stack, name: str, server_key: str) -> None:
        self.root = short_tmpdir("gpr")
        self.data_dir = self.root / "data"
        self.ports = dict(zip(("http-proxy", "socks5-proxy", "dns-proxy", "control"), free_ports(4)))
        self.public = keys(self.data_dir)
        bus = stack.config["bus"]
        self.cfg_path = self.root / "config.yaml"
        # The harness's base config (a fast heartbeat, one worker) on these ports, without the API
        # and the DNS listener, against the central bus and recorder.
        write_config(
            self.cfg_path,
            {
                "greyproxy": {"addr": ""},
                "bus": {
                    "pub": bus["pub"],
                    "sub": bus["sub"],
                    "journal": bus["journal"],
                    "recorderControl": bus["recorderControl"],
                    "proxyControl": f"tcp://127.0.0.1:{self.ports['control']}",
                    "serverKey": server_key,
                },
                "proxy": {"name": name, "rulesFrom": "recorder", "holdTimeout": 20},
            },
            {
                "api": 0,
                "http-proxy": self.ports["http-proxy"],
                "socks5-proxy": self.ports["socks5-proxy"],
                "dns-proxy": 0,
            },
        )
        self.log_path = self.root / "proxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "greyproxy", "run", "proxy", "-C", str(self.cfg_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=service_env(self.data_dir),
                cwd=str(REPO),
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def central() -> Iterator[Stack]:
    # free_ports never hands out a port twice, so the Stack's own four cannot be the bus's (a socks5
    # listener once got the bus's port).
    p = free_ports(4)
    s = Stack(
        {
            "bus": {
                "pub": f"tcp://127.0.0.1:{p[0]}",
                "sub": f"tcp://127.0.0.1:{p[1]}",
                "journal": f"tcp://127.0.0.1:{p[2]}",
                "recorderControl": f"tcp://127.0.0.1:{p[3]}",
            }
        }
    )
    s.central_key = keys(s.data_dir)  # type: ignore[attr-defined]
    with s:
        yield s


def _joined(central: Stack, name: str, key_name: str) -> Remote:
    """A remote proxy `name` whose key the central host allows as `key_name` (and which allows the
    central key), started and up in the central health."""
    remote = Remote(central, name, central.central_key)  # type: ignore[attr-defined]
    keys(central.data_dir, "allow", key_name, remote.public)
    keys(remote.data_dir, "allow", "central", central.central_key)  # type: ignore[attr-defined]
    remote.start()
    wait_for(
        lambda: (central.health()[1].get("services") or {}).get(name, {}).get("up"),
        20,
        message=f"{name} up in the central health\n{remote.log()}",
    )
    return remote


def _revoke_quietly(central: Stack, key_name: str) -> None:
    """Clean-up: the key allowed by a test, revoked (not checked: the test may have failed first)."""
    subprocess.run(
        [PYTHON, "-m", "greyproxy", "keys", "revoke", key_name],
        env=service_env(central.data_dir),
        cwd=str(REPO),
        capture_output=True,
        timeout=30,
    )


def _curl(port: int, container: str, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "curl",
            "-s",
            "-S",
            "--max-time",
            "25",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-x",
            f"http://{container}@127.0.0.1:{port}",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_remote_proxy_judged_and_recorded_centrally(central: Stack, origin: int) -> None:
    # Each side allows the other's key: the remote connects to the central bus and recorder,
    # the central API connects to the remote's control endpoint.
    remote = _joined(central, "proxy-b", "host-b")
    try:
        # A rule made centrally judges the remote proxy's traffic.
        add_rule(
            central,
            container_pattern="hostb-ok",
            action="allow",
            destination_pattern=ORIGIN_HOST,
            port_pattern=str(origin),
        )
        port = remote.ports["http-proxy"]
        out = wait_for(
            lambda: (
                (o := _curl(port, "hostb-ok", f"http://{ORIGIN_HOST}:{origin}/b").communicate(30)[0]).endswith("\n200")
                and o
            ),
            10,
            message="the central allow rule reaching proxy-b",
        )
        assert "hello from origin /b" in out
        # An unknown destination is held by the remote proxy, pending centrally, released by the API.
        proc = _curl(port, "hostb-new", f"http://{ORIGIN_HOST}:{origin}/held")
        entry = wait_for(
            lambda: next(
                (i for i in central.get("/api/pending", params={"container": "hostb-new"}).json()["items"]), None
            ),
            10,
            message="pending entry from proxy-b",
        )
        assert proc.poll() is None
        dash = central.get("/api/dashboard").json()
        assert dash["waiting"] == 1, dash  # the API asked proxy-b over tcp:// (CURVE) too
        assert central.request("POST", f"/api/pending/{entry['id']}/allow", json={}).status_code == 200
        out, _ = proc.communicate(timeout=15)
        assert out.endswith("\n200"), out

        # Recorded centrally.
        def both_logged() -> set[str] | None:
            names = {i["container_name"] for i in log_entries(central, "hostb", limit=50)}
            return names if names >= {"hostb-ok", "hostb-new"} else None

        wait_for(both_logged, 10, message="proxy-b's log rows (hostb-ok, hostb-new) in the central database")
        assert not (remote.data_dir / "greyproxy.db").exists(), "the remote proxy must not keep a store"

        # Stopped cleanly, it leaves: its last heartbeat says so, and the central stack is whole
        # again at once (not degraded for good by a proxy that is gone).
        assert remote.proc is not None
        remote.proc.terminate()
        remote.proc.wait(10)
        wait_for(
            lambda: (h := central.health())[0] == 200 and "proxy-b" not in h[1]["services"],
            5,
            message="the central health without proxy-b, ok",
        )
    finally:
        remote.stop()


def test_peer_with_unknown_key_is_refused_and_logged(central: Stack, origin: int) -> None:
    stranger = Remote(central, "proxy-x", central.central_key)  # type: ignore[attr-defined]
    try:
        # The stranger trusts the central key, but the central host never allowed the stranger's.
        keys(stranger.data_dir, "allow", "central", central.central_key)  # type: ignore[attr-defined]
        stranger.start()
        log_dir = central.data_dir / "logs"

        def refusal() -> bool:
            text = "".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))
            return stranger.public in text and "refused a bus peer" in text

        wait_for(refusal, 20, message="the refusal in the central logs")
        time.sleep(1.0)
        services = central.health()[1]["services"]
        assert "proxy-x" not in services  # its heartbeats never got onto the bus
        # A plain (non-CURVE) client gets nothing out of a tcp:// endpoint either.
        with pytest.raises(ServiceUnavailable):
            call_sync(central.config["bus"]["recorderControl"], "recorder", "view.rules", timeout=0.5, retries=1)
        # Its rules never arrive: it cannot start (rulesFrom: recorder answers nobody unknown). It
        # waits, saying why in its own log, with the command that lets it in, key quoted for a shell.
        assert central.get("/api/logs", params={"container": "stranger"}).json()["items"] == []
        wait_for(
            lambda: "waiting for the recorder at" in stranger.log(),
            20,
            message=f"the stranger's own log naming the refusal\n{stranger.log()}",
        )
        assert "refused this host's CURVE key" in stranger.log()
        assert f"greyproxy keys allow proxy-x '{stranger.public}'" in stranger.log()
        assert stranger.proc is not None and stranger.proc.poll() is None, "it waits; it does not exit"
        assert "Traceback" not in stranger.log()

        # Once the central host allows it (no restart on either side), it starts by itself: its
        # heartbeats reach the bus (the publisher the bus refused connects again), its traffic is
        # judged by the central rules and recorded centrally.
        keys(central.data_dir, "allow", "proxy-x", stranger.public)
        wait_for(
            lambda: (central.health()[1].get("services") or {}).get("proxy-x", {}).get("up"),
            30,
            message=f"proxy-x up in the central health once allowed\n{stranger.log()}",
        )
        assert "the recorder at" in stranger.log() and "answers" in stranger.log()
        out, _ = _curl(stranger.ports["http-proxy"], "stranger", "http://127.0.0.1:9/").communicate(30)
        assert out.endswith("\n502"), out  # allowed by the builtin loopback rule; nothing listens on :9
        wait_for(
            lambda: central.get("/api/logs", params={"container": "stranger"}).json()["items"],
            10,
            message="the stranger's log entry in the central store",
        )
    finally:
        stranger.stop()  # first: a failed clean-up step below must not leave it running
        _revoke_quietly(central, "proxy-x")


def test_a_remote_proxy_that_never_allowed_the_central_key_is_unreachable_until_it_does(
    central: Stack, origin: int
) -> None:
    """The other half of the key exchange forgotten: B joins (its heartbeats arrive) but refuses
    the central API's calls. /api/health says so ("unreachable", degraded) instead of ok; the API's
    log names the fix; once B allows the key (no restart), it is up and gets the silent mode set
    meanwhile."""
    remote = Remote(central, "proxy-d", central.central_key)  # type: ignore[attr-defined]
    try:
        keys(central.data_dir, "allow", "host-d", remote.public)
        remote.start()

        def state() -> str | None:
            return (central.health()[1].get("services") or {}).get("proxy-d", {}).get("state")

        wait_for(lambda: state() == "unreachable", 20, message=f"proxy-d unreachable\n{remote.log()}")
        code, body = central.health()
        assert code == 503 and "proxy-d" in body["down"]
        api_log = central.data_dir / "logs" / "api.log"
        wait_for(
            lambda: (
                "greyproxy keys allow " in api_log.read_text()
                and "proxy proxy-d does not answer" in api_log.read_text()
            ),
            10,
            message="the API's log naming why proxy-d does not answer",
        )
        assert "refused this host's CURVE key" in api_log.read_text()
        r = central.request("POST", "/api/allowall", json={"mode": "deny", "duration_seconds": 120})
        assert r.status_code == 200  # the reachable proxies took it

        keys(remote.data_dir, "allow", "central", central.central_key)  # type: ignore[attr-defined]
        wait_for(lambda: state() == "up", 20, message=f"proxy-d up once it allowed the central key\n{remote.log()}")
        # It missed the silent deny while unreachable: given again when it answered.
        out, _ = _curl(remote.ports["http-proxy"], "hostd", f"http://{ORIGIN_HOST}:{origin}/x").communicate(30)
        assert out.endswith("\n403"), out
    finally:
        remote.stop()
        central.request("DELETE", "/api/allowall")
        keys(central.data_dir, "revoke", "host-d")


def test_a_revoked_key_is_cut_off_while_connected(central: Stack) -> None:
    """SPEC §15 and docs/configuration.md ("revoking one needs no restart"): ZeroMQ checks a CURVE
    key when a peer connects, never after. A peer connected when its key is revoked was left
    connected: a proxy on another host went on sending and receiving. The processes that bind
    tcp:// endpoints see the revocation within a heartbeat or two, bind again (every connection
    ends), and only authorized peers get back in."""
    import zmq

    from bus import message

    public, secret = zmq.curve_keypair()
    server_key = central.central_key.encode()  # type: ignore[attr-defined]
    keys(central.data_dir, "allow", "peer-z", public.decode())
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.curve_publickey, sub.curve_secretkey, sub.curve_serverkey = public, secret, server_key
    sub.setsockopt(zmq.SUBSCRIBE, b"service.heartbeat")
    sub.connect(central.config["bus"]["sub"])
    try:
        assert sub.poll(10_000), "no heartbeat through the bus for an allowed key"
        message.decode(sub.recv_multipart())
        keys(central.data_dir, "revoke", "peer-z")
        t0 = time.monotonic()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 3.0:  # heartbeats come every second while connected
            assert time.monotonic() - t0 < 20, "the revoked peer still gets the bus's messages"
            if sub.poll(200):
                sub.recv_multipart()
                quiet_since = time.monotonic()
        bus_log = (central.data_dir / "logs" / "bus.log").read_text()
        assert "a key was revoked: the connections to" in bus_log
        wait_for(
            lambda: "refused a bus peer" in (central.data_dir / "logs" / "bus.log").read_text(),
            10,
            message="the revoked key refused when it connects again",
        )
        # the stack's own processes (authorized: the host's own key) are back on the bus
        wait_for(lambda: central.health()[0] == 200, 15, message="the stack healthy again")
    finally:
        sub.close(linger=0)
        ctx.term()


def test_records_made_while_the_key_was_revoked_arrive_once_it_is_allowed_again(central: Stack) -> None:
    """SPEC §15 (several hosts) and docs/configuration.md: B's key revoked on the central host cuts B off (the
    revocation above); B goes on deciding with the rules it has and keeps its records; once the key
    is allowed again they reach the central store. Before, B's journal never sent again: ZeroMQ
    does not reconnect a socket whose handshake was refused, and with nothing in flight no ack
    timeout reopened it (found by an outside run), so the records stayed in B until it stopped."""
    remote = _joined(central, "proxy-r", "host-r")
    try:
        port = remote.ports["http-proxy"]
        out, _ = _curl(port, "revoked-before", "http://127.0.0.1:9/").communicate(30)
        assert out.endswith("\n502"), out  # the builtin loopback rule; nothing listens on :9
        wait_for(
            lambda: central.get("/api/logs", params={"container": "revoked-before"}).json()["items"],
            10,
            message="proxy-r's record before the revocation",
        )
        keys(central.data_dir, "revoke", "host-r")
        wait_for(
            lambda: not (central.health()[1].get("services") or {}).get("proxy-r", {}).get("up"),
            20,
            message="proxy-r cut off (its heartbeats no longer reach the bus)",
        )
        for i in range(3):  # decided by proxy-r with the rules it has; journalled, not deliverable
            out, _ = _curl(port, f"revoked-during-{i}", "http://127.0.0.1:9/").communicate(30)
            assert out.endswith("\n502"), out
        time.sleep(2)
        assert central.get("/api/logs", params={"container": "revoked-during"}).json()["items"] == []
        keys(central.data_dir, "allow", "host-r", remote.public)
        got = wait_for(
            lambda: (
                len(items := central.get("/api/logs", params={"container": "revoked-during"}).json()["items"]) == 3
                and items
            ),
            40,
            message=f"the records made while revoked, in the central store\n{remote.log()[-3000:]}",
        )
        assert {i["container_name"] for i in got} == {f"revoked-during-{i}" for i in range(3)}
        assert remote.proc is not None and remote.proc.poll() is None
    finally:
        remote.stop()
        _revoke_quietly(central, "host-r")


def test_a_remote_proxy_without_rules_from_recorder_says_it_judges_alone(central: Stack) -> None:
    """SPEC §15 (several hosts) and docs/configuration.md: forgetting `rulesFrom: recorder` on host B made it judge with a
    database of its own, silently (its holds showed centrally, allowing them there did nothing)."""
    import yaml

    remote = Remote(central, "proxy-alone", central.central_key)  # type: ignore[attr-defined]
    try:
        cfg = yaml.safe_load(remote.cfg_path.read_text())
        cfg["proxy"]["rulesFrom"] = "database"
        remote.cfg_path.write_text(yaml.safe_dump(cfg))
        keys(central.data_dir, "allow", "host-alone", remote.public)
        remote.start()
        wait_for(
            lambda: "rulesFrom is database with a tcp:// journal" in remote.log(),
            20,
            message=f"the warning in the remote's log\n{remote.log()}",
        )
        assert "proxy.rulesFrom: recorder" in remote.log()
    finally:
        remote.stop()
        _revoke_quietly(central, "host-alone")


def test_a_remote_proxy_holding_a_raw_ip_gets_its_name_from_the_central_database(central: Stack) -> None:
    """SPEC §6, §15: a client of host B connects by IP to an address whose name the central host
    knows (its DNS proxy answered it: a `dns` record in the central database) but B does not (B
    reads the names at start; the bus's dns.name is for workers of one host). Held as unknown,
    it used to wait for a person or its hold timeout although a rule allowed the name; B's 2 s check
    now asks the central recorder for the names of the addresses it holds (`view.dns_names` with
    `ips`, over tcp:// and CURVE), and the name's rule releases it."""
    import sqlite3

    ip = "127.0.0.57"
    with plain_origin(PathHandler, ip) as port:
        remote = _joined(central, "proxy-d", "host-d")
        rule = add_rule(
            central,
            container_pattern="hostd",
            action="allow",
            destination_pattern="named.multi.test",
            port_pattern=str(port),
        )
        try:
            proc = _curl(remote.ports["http-proxy"], "hostd", f"http://{ip}:{port}/named")
            wait_for(
                lambda: central.get("/api/pending", params={"container": "hostd"}).json()["items"],
                10,
                message="the raw IP held by proxy-d",
            )
            assert proc.poll() is None
            db = sqlite3.connect(str(central.db_path), timeout=10)
            try:  # what the recorder writes for a DNS answer of the central proxy (dns_cache.UPSERT)
                with db:
                    db.execute(
                        "INSERT INTO dns_cache (ip, hostname, updated_at) VALUES (?, ?, ?) ON CONFLICT(ip)"
                        " DO UPDATE SET hostname = excluded.hostname, updated_at = excluded.updated_at",
                        (ip, "named.multi.test", time.time()),
                    )
            finally:
                db.close()
            t0 = time.monotonic()
            out, _ = proc.communicate(timeout=15)
            assert out.endswith("\n200") and "hello from origin /named" in out, (out, remote.log())
            assert time.monotonic() - t0 < 6  # the 2 s check, not the 20 s hold timeout
            entry = wait_for(
                lambda: next((i for i in log_entries(central, "hostd") if i["result"] == "allowed"), None),
                10,
                message="proxy-d's allowed log row",
            )
            assert entry["resolved_hostname"] == "named.multi.test" and entry["rule_id"] == rule["id"]
        finally:
            central.request("DELETE", f"/api/rules/{rule['id']}")
            remote.stop()
            _revoke_quietly(central, "host-d")
