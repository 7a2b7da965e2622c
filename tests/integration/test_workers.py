"""proxy.workers: 2 (SPEC §15): two proxy processes on the same listeners, one shared state.

Each check makes sure both workers really took part (asking each worker's own control endpoint),
so a test cannot pass because the kernel happened to hand every connection to one of them.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from bus.reqrep import call_sync
from conftest import PathHandler, Stack, add_rule, curl_proxy, log_entries, plain_origin, proxy_connect, wait_for
from greyproxy import __version__
from greyproxy.config import load_config

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

ORIGIN_HOST = "127.0.0.2"


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(PathHandler, ORIGIN_HOST) as port:
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"proxy": {"workers": 2, "holdTimeout": 25}}) as s:
        yield s


def worker_endpoints(stack: Stack) -> list[str]:
    cfg = load_config(stack.cfg_path, env={"GREYPROXY_DATA_HOME": str(stack.data_dir)})
    eps = cfg.proxy_control_endpoints()
    assert len(eps) == 2
    return eps


def per_worker(stack: Stack, op: str) -> list[dict]:
    return [call_sync(ep, "proxy", op, {}, timeout=2.0, retries=2) for ep in worker_endpoints(stack)]


def allowed_by_worker(stack: Stack) -> list[int]:
    return [int(w["metrics"]["connections"]["allowed"]) for w in per_worker(stack, "stats")]


def counts_reaching(stack: Stack, key: str, total: int, timeout: float = 10) -> list[int]:
    """Each worker's `stats[key]`, once they add up to `total`."""

    def check() -> list[int] | None:
        c = [int(w[key]) for w in per_worker(stack, "stats")]
        return c if sum(c) == total else None

    return wait_for(check, timeout, message=f"{key} adding up to {total}")


def on_both_workers(open_one: Callable[[int], object], counts: Callable[[int], list[int]], at_least: int) -> int:
    """Open `at_least` things with `open_one(i)`, then more, one at a time, until `counts(n)` (one figure per
    worker after n opened) shows both workers took some. The kernel spreads new connections over the
    SO_REUSEPORT listeners by a hash, so a fixed handful can all land on one worker (1 in 128 for 8):
    up to 48 are opened before the test fails (a chance of 1 in 10^14 if the kernel spreads them at all)."""
    n = 0
    while True:
        open_one(n)
        n += 1
        if n >= at_least:
            per = counts(n)
            if min(per) > 0 or n >= 48:
                assert min(per) > 0, f"every one of {n} on one worker: {per}"
                return n


def _connect(stack: Stack, container: str, target: str) -> socket.socket:
    return proxy_connect(stack, container, target, timeout=30)


def _read_head(s: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def test_health_lists_each_worker(stack: Stack) -> None:
    code, body = stack.health()
    assert code == 200, body
    services = body["services"]
    assert services["proxy-0"]["up"] and services["proxy-1"]["up"]
    assert services["proxy-0"]["pid"] != services["proxy-1"]["pid"]
    assert services["proxy"]["up"] is True and services["proxy"]["workers"] == ["proxy-0", "proxy-1"]
    # Both bound the same listening address (SO_REUSEPORT) and serve it.
    assert {w["active_connections"] for w in per_worker(stack, "stats")} == {0}
    # serve's first line says where everything is, the workers included.
    banner = stack.serve_log.read_text().splitlines()[0]
    p = stack.ports
    assert banner.startswith(f"greyproxy {__version__}: API http://127.0.0.1:{p['api']}/ | "), banner
    listeners = f"http-proxy :{p['http-proxy']} socks5-proxy :{p['socks5-proxy']} dns-proxy :{p['dns-proxy']}"
    assert f" | {listeners} (2 proxy workers) | data {stack.data_dir} | logs " in banner, banner


def test_eight_holds_on_both_workers_released_by_one_bulk_allow(stack: Stack, origin: int) -> None:
    socks: list[socket.socket] = []

    def hold_one(i: int) -> None:
        socks.append(_connect(stack, f"wk{i}", f"{ORIGIN_HOST}:{origin}"))

    try:
        held = on_both_workers(hold_one, lambda n: counts_reaching(stack, "waiting", n), 8)
        dash = stack.get("/api/dashboard").json()
        assert dash["waiting"] == held, dash
        items = stack.get("/api/pending", params={"container": "wk", "limit": 100}).json()["items"]
        ids = [i["id"] for i in items if i["container_name"].startswith("wk")]
        assert len(ids) == held
        t0 = time.monotonic()
        r = stack.request("POST", "/api/pending/bulk-allow", json={"pending_ids": ids})
        assert r.status_code == 200, r.text
        for s in socks:
            assert _read_head(s).startswith(b"HTTP/1.1 200"), "a held CONNECT was not released"
        assert time.monotonic() - t0 < 5.0
        assert stack.get("/api/dashboard").json()["waiting"] == 0
    finally:
        for s in socks:
            s.close()


def test_dashboard_counts_connections_of_both_workers(stack: Stack, origin: int) -> None:
    rule = add_rule(
        stack, container_pattern="dash*", destination_pattern=ORIGIN_HOST, port_pattern=str(origin), action="allow"
    )
    socks: list[socket.socket] = []

    def open_one(i: int) -> None:
        s = _connect(stack, f"dash{i}", f"{ORIGIN_HOST}:{origin}")
        socks.append(s)
        assert _read_head(s).startswith(b"HTTP/1.1 200")

    try:
        n = on_both_workers(open_one, lambda n: counts_reaching(stack, "active_connections", n), 10)
        assert stack.get("/api/dashboard").json()["active_connections"] == n
    finally:
        for s in socks:
            s.close()
        stack.request("DELETE", f"/api/rules/{rule['id']}")


def test_silent_mode_reaches_every_worker(stack: Stack, origin: int) -> None:
    r = stack.request("POST", "/api/allowall", json={"mode": "allow", "duration_seconds": 60})
    assert r.status_code == 200 and r.json()["active"] is True
    try:
        assert all(w["active"] and w["mode"] == "allow" for w in per_worker(stack, "allowall.get"))
        before = allowed_by_worker(stack)
        socks: list[socket.socket] = []

        def open_one(i: int) -> None:
            s = _connect(stack, f"silent{i}", f"{ORIGIN_HOST}:{origin}")
            socks.append(s)
            assert _read_head(s).startswith(b"HTTP/1.1 200")  # no rule: allowed by silent mode alone

        def took(n: int) -> list[int]:
            return [a - b for a, b in zip(allowed_by_worker(stack), before)]

        try:
            on_both_workers(open_one, took, 8)
        finally:
            for s in socks:
                s.close()
    finally:
        r = stack.request("DELETE", "/api/allowall")
    assert r.json()["active"] is False
    assert not any(w["active"] for w in per_worker(stack, "allowall.get"))


def test_rule_delete_closes_tunnels_on_every_worker(stack: Stack, origin: int) -> None:
    rule = add_rule(
        stack, container_pattern="tun*", destination_pattern=ORIGIN_HOST, port_pattern=str(origin), action="allow"
    )
    socks: list[socket.socket] = []

    def open_one(i: int) -> None:
        s = _connect(stack, f"tun{i}", f"{ORIGIN_HOST}:{origin}")
        socks.append(s)
        assert _read_head(s).startswith(b"HTTP/1.1 200")

    try:
        on_both_workers(open_one, lambda n: counts_reaching(stack, "tunnels", n), 8)
        t0 = time.monotonic()
        assert stack.request("DELETE", f"/api/rules/{rule['id']}").json()["deleted"] is True
        for s in socks:
            s.settimeout(8)
            try:
                data = s.recv(1024)
            except ConnectionResetError:
                data = b""
            assert data == b"", data
        assert time.monotonic() - t0 < 8.0  # closed by the delete, long before the 600 s idle timeout
    finally:
        for s in socks:
            s.close()


def test_restarted_worker_gets_silent_mode_again(stack: Stack) -> None:
    import os
    import signal

    r = stack.request("POST", "/api/allowall", json={"mode": "deny", "duration_seconds": 120})
    assert r.status_code == 200 and r.json()["mode"] == "deny"
    try:
        old = stack.health()[1]["services"]["proxy-1"]["pid"]
        os.kill(old, signal.SIGKILL)  # supervisord starts a new proxy-1, with silent mode off in its memory
        wait_for(
            lambda: (s := stack.health()[1]["services"]["proxy-1"])["up"] and s["pid"] != old,
            20,
            message="proxy-1 restarted",
        )

        def all_silent() -> list[dict] | None:
            w = per_worker(stack, "allowall.get")
            return w if all(x["active"] for x in w) else None

        states = wait_for(all_silent, 10, message="silent mode on the restarted worker")
        assert all(x["mode"] == "deny" and 0 < x["remaining_seconds"] <= 120 for x in states)
        # the same end on every worker (it was given again rounded up to the second: up to 1 s later)
        assert len({x["expires_at"] for x in states}) == 1, states
    finally:
        stack.request("DELETE", "/api/allowall")
    assert not any(w["active"] for w in per_worker(stack, "allowall.get"))


def test_a_restarted_worker_is_in_silent_mode_from_its_first_connection(stack: Stack, origin: int) -> None:
    """SPEC §4 ("while active, rules and pending are bypassed") and §15: a worker restarted while
    deny mode is on denies from its first connection. Before, it opened its listeners in normal
    mode and took the mode from the API 30-150 ms later: an outside run saw 1-6 of ~540 requests
    allowed by a rule in that gap. Now the mode kept in the run dir is read before it listens."""
    import os
    import signal

    add_rule(stack, container_pattern="gap", destination_pattern=ORIGIN_HOST, port_pattern=str(origin), action="allow")
    r = stack.request("POST", "/api/allowall", json={"mode": "deny", "duration_seconds": 120})
    assert r.status_code == 200 and r.json()["mode"] == "deny"
    statuses: dict[bytes, int] = {}
    try:
        old = stack.health()[1]["services"]["proxy-0"]["pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        back_at = None
        while time.monotonic() < deadline and (back_at is None or time.monotonic() < back_at + 1.5):
            try:
                s = _connect(stack, "gap", f"{ORIGIN_HOST}:{origin}")
            except OSError:
                continue  # (the kernel handed it to the dead worker's closing socket)
            with s:
                s.settimeout(5)
                try:
                    status = _read_head(s)[9:12]
                except OSError:
                    status = b"---"
            statuses[status] = statuses.get(status, 0) + 1
            if back_at is None:
                h = stack.health()[1]["services"]["proxy-0"]
                if h["up"] and h["pid"] != old:
                    back_at = time.monotonic()
        assert back_at is not None, "proxy-0 never came back"
        log = (stack.data_dir / "logs" / "proxy-0.log").read_text()
        assert "silent mode deny taken from" in log
    finally:
        stack.request("DELETE", "/api/allowall")
    assert statuses.get(b"403", 0) > 0 and b"200" not in statuses, statuses


def test_the_end_of_silent_mode_is_announced_when_the_first_worker_is_down_then(stack: Stack) -> None:
    """SPEC §4: `allowall.changed` with the status, also when it expires. The API announces it (set,
    cleared, ended). Before, the first worker did: killed around the end, it announced nothing."""
    import os
    import signal

    import orjson
    from websockets.sync.client import connect

    with connect(stack.api.replace("http://", "ws://", 1) + "/ws", open_timeout=5) as ws:
        assert orjson.loads(ws.recv(timeout=5))["type"] == "connected"
        ws.send(orjson.dumps({"command": "subscribe", "event_type": "allowall.changed"}).decode())
        r = stack.request("POST", "/api/allowall", json={"mode": "allow", "duration_seconds": 3})
        assert r.status_code == 200 and r.json()["active"] is True
        t0 = time.monotonic()
        time.sleep(2.0)
        os.kill(stack.health()[1]["services"]["proxy-0"]["pid"], signal.SIGKILL)  # back after the end
        changes = []
        while time.monotonic() < t0 + 10:
            try:
                m = orjson.loads(ws.recv(timeout=max(0.1, t0 + 10 - time.monotonic())))
            except TimeoutError:
                break
            if m.get("type") == "allowall.changed":
                changes.append((round(time.monotonic() - t0, 1), m["data"]["active"]))
                if not m["data"]["active"]:
                    break
    assert [a for _t, a in changes] == [True, False], changes
    assert 2.9 <= changes[-1][0] <= 4.5, changes  # at its end, not at the next heartbeat
    wait_for(lambda: stack.health()[1]["services"]["proxy-0"]["up"], 20, message="proxy-0 back")


def test_silent_mode_survives_an_api_restart_then_a_worker_restart(stack: Stack) -> None:
    """SPEC §4 and §15 (silent mode reaches every worker): the API that gives a restarted worker
    the silent mode must know it, also after the API itself was restarted. The new API learns the
    mode from the longest-running worker. Before, it knew nothing: a worker restarted after it
    stayed in normal mode while the other denied, and GET /api/allowall said "off"."""
    import os
    import signal

    r = stack.request("POST", "/api/allowall", json={"mode": "deny", "duration_seconds": 300})
    assert r.status_code == 200 and r.json()["mode"] == "deny"
    try:
        for name in ("api", "proxy-0"):
            old = stack.health()[1]["services"][name]["pid"]
            os.kill(old, signal.SIGKILL)
            wait_for(
                lambda name=name, old=old: (s := stack.health()[1]["services"][name])["up"] and s["pid"] != old,
                30,
                message=f"{name} restarted",
            )
            time.sleep(1.0 if name == "api" else 0)  # proxy-0 dies once the new API has heard the workers

        def all_deny() -> list[dict] | None:
            w = per_worker(stack, "allowall.get")
            return w if all(x["active"] and x["mode"] == "deny" for x in w) else None

        states = wait_for(all_deny, 15, message="deny mode on every worker after the API and proxy-0 restarted")
        assert all(0 < x["remaining_seconds"] <= 300 for x in states)
        status = stack.get("/api/allowall").json()
        assert status["active"] and status["mode"] == "deny"
    finally:
        stack.request("DELETE", "/api/allowall")
    assert not any(w["active"] for w in per_worker(stack, "allowall.get"))


def test_restart_counts_outlive_an_api_restart_and_count_the_apis_own(stack: Stack) -> None:
    """SPEC §5 (/api/health `restarts`), README ("counts each service's restarts after a death"):
    the counts are kept in the run dir for the life of the stack. Before, an API started again
    after a death began them all at zero, and never counted its own deaths (its entry had none)."""
    import os
    import signal

    def counts() -> dict[str, int]:
        services = stack.health()[1]["services"]
        return {n: services[n].get("restarts", -1) for n in ("proxy-0", "proxy-1", "api")}

    old = stack.health()[1]["services"]["proxy-1"]["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(
        lambda: (s := stack.health()[1]["services"]["proxy-1"])["up"] and s["pid"] != old, 30, message="proxy-1 back"
    )
    before = wait_for(lambda: (c := counts())["proxy-1"] >= 1 and c, 10, message="proxy-1's restart counted")
    api = stack.health()[1]["services"]["api"]["pid"]
    os.kill(api, signal.SIGKILL)
    wait_for(lambda: stack.health()[1]["services"]["api"]["pid"] != api, 30, message="the API back")
    after = wait_for(lambda: (c := counts())["proxy-1"] >= before["proxy-1"] and c, 10, message="the counts read back")
    assert after["proxy-1"] == before["proxy-1"] and after["proxy-0"] == before["proxy-0"], (before, after)
    assert after["api"] == before["api"] + 1, (before, after)
    assert stack.health()[1]["services"]["api"]["last_restart"] is not None


def test_metrics_list_each_worker_and_sum_them(stack: Stack) -> None:
    text = stack.get("/metrics").text
    assert 'greyproxy_up{service="proxy-0"} 1.0' in text and 'greyproxy_up{service="proxy-1"} 1.0' in text
    assert 'greyproxy_up{service="proxy"} 1.0' in text
    assert "greyproxy_proxy_active_connections" in text


def test_one_journal_takes_every_workers_records(stack: Stack, origin: int) -> None:
    rule = add_rule(
        stack, container_pattern="jr", destination_pattern=ORIGIN_HOST, port_pattern=str(origin), action="allow"
    )
    before = allowed_by_worker(stack)

    def get_one(i: int) -> None:  # a new connection each: the kernel spreads them over the workers
        out, _ = curl_proxy(stack, f"http://{ORIGIN_HOST}:{origin}/j{i}", "jr")
        assert out == "200", out

    def took(n: int) -> list[int]:
        per = [a - b for a, b in zip(allowed_by_worker(stack), before)]
        assert sum(per) == n, per
        return per

    try:
        n = on_both_workers(get_one, took, 12)

        def rows() -> list[dict] | None:
            mine = [i for i in log_entries(stack, "jr") if i["container_name"] == "jr"]
            return mine if len(mine) >= n else None

        logged = wait_for(rows, 10, message=f"{n} log rows")
        assert len(logged) == n and len({i["id"] for i in logged}) == n  # none lost, none stored twice
    finally:
        stack.request("DELETE", f"/api/rules/{rule['id']}")


def test_max_pending_across_workers_holds_queued_keys_and_sees_dismissals_at_once() -> None:
    """proxy.maxPending with two workers (SPEC §3.1, §15): past the cap a *new* destination is
    refused at once (403, `queue_full`), whichever worker takes it; a connection to a destination
    already queued is held, on either worker (before: refused by the worker that did not hold it);
    a dismissal frees room for the next new destination at once (before: after the worker's next
    count, up to 5 s)."""
    socks: list[socket.socket] = []

    def held_or_refused(s: socket.socket) -> bytes | None:
        s.settimeout(1.5)
        try:
            return _read_head(s) or b"closed"
        except TimeoutError:
            return None  # held: no answer yet

    with Stack({"proxy": {"workers": 2, "holdTimeout": 30, "maxPending": 2}}) as s:
        try:
            for host in ("127.0.0.21", "127.0.0.22"):  # two new destinations: the queue is full
                c = _connect(s, "capped", f"{host}:9")
                socks.append(c)
                assert held_or_refused(c) is None, host
            wait_for(lambda: s.get("/api/pending/count").json()["count"] == 2, 10, message="two pending")
            c = _connect(s, "capped", "127.0.0.23:9")
            socks.append(c)
            assert (held_or_refused(c) or b"").startswith(b"HTTP/1.1 403"), "a third new destination"
            # the first destination again, from new connections: both workers take some, each is held
            opened: list[socket.socket] = []

            def open_one(i: int) -> None:
                c = _connect(s, "capped", "127.0.0.21:9")
                opened.append(c)
                socks.append(c)

            def waiting(n: int) -> list[int]:
                wait_for(lambda: sum(w["count"] for w in waiters_all()) >= n + 1, 10, message=f"{n + 1} held")
                return [sum(w["count"] for w in ws["waiters"]) for ws in per_worker(s, "waiters")]

            def waiters_all() -> list[dict]:
                return [w for ws in per_worker(s, "waiters") for w in ws["waiters"] if w["host"] == "127.0.0.21"]

            on_both_workers(open_one, waiting, at_least=4)
            assert all(held_or_refused(c) is None for c in opened[:2])
            # a dismissal: room for a new destination at once
            pid = next(p["id"] for p in s.get("/api/pending").json()["items"] if p["destination_host"] == "127.0.0.22")
            assert s.request("DELETE", f"/api/pending/{pid}").status_code in (200, 204)
            t0 = time.monotonic()
            c = _connect(s, "capped", "127.0.0.24:9")
            socks.append(c)
            assert held_or_refused(c) is None and time.monotonic() - t0 < 3
        finally:
            for c in socks:
                c.close()
