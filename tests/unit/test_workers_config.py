"""proxy.workers pieces without sockets: the setting, worker endpoints, the supervisord rendering,
and how the API merges the workers' answers."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from greyproxy.cli import render_supervisord_conf
from greyproxy.config import ConfigError, load_config, resolve_workers, worker_endpoint
from services.api.proxies import merge

REPO = Path(__file__).resolve().parents[2]


def test_auto_is_the_cpus_at_most_eight() -> None:
    assert resolve_workers("auto", cpus=2) == 2
    assert resolve_workers("auto", cpus=1) == 1
    assert resolve_workers("auto", cpus=32) == 8
    assert resolve_workers(3) == 3


@pytest.mark.parametrize("bad", [0, -1, 65, "two", True, 1.5])
def test_bad_worker_counts_are_refused(bad, tmp_path) -> None:
    with pytest.raises(ConfigError, match="proxy.workers"):
        resolve_workers(bad)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"proxy: {{workers: {bad!r}}}\n" if not isinstance(bad, str) else f"proxy: {{workers: {bad}}}\n")
    with pytest.raises(ConfigError, match="proxy.workers"):
        load_config(cfg, env={"GREYPROXY_DATA_HOME": str(tmp_path)})


def test_worker_endpoints(tmp_path) -> None:
    assert worker_endpoint("ipc:///run/proxy-control.sock", 1) == "ipc:///run/proxy-control-1.sock"
    assert worker_endpoint("tcp://127.0.0.1:7000", 3) == "tcp://127.0.0.1:7003"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("proxy: {workers: 3}\n")
    cfg = load_config(cfg_path, env={"GREYPROXY_DATA_HOME": str(tmp_path)})
    eps = cfg.proxy_control_endpoints()
    assert len(eps) == 3 and len(set(eps)) == 3 and cfg.proxy_name == "proxy"
    worker = load_config(cfg_path, env={"GREYPROXY_DATA_HOME": str(tmp_path), "GREYPROXY_WORKER": "2"})
    assert worker.proxy_name == "proxy-2" and worker.proxy_control == eps[2]
    one = load_config(None, env={"GREYPROXY_DATA_HOME": str(tmp_path)})
    assert one.proxy_control == one.bus["proxyControl"]  # a lone proxy: the endpoint as configured


def test_caps_are_split_only_over_the_workers_serve_starts(tmp_path) -> None:
    """A proxy run on its own (another host's `greyproxy run proxy`, workers: auto by default) is
    the only one: its caps are not divided by proxy.workers it does not run."""
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("proxy: {workers: 4}\n")
    env = {"GREYPROXY_DATA_HOME": str(tmp_path)}
    assert load_config(cfg_path, env={**env, "GREYPROXY_WORKER": "1"}).caps_split == 4
    assert load_config(cfg_path, env=env).caps_split == 1
    assert load_config(None, env=env).worker is None and load_config(None, env=env).caps_split == 1


def test_supervisord_conf_for_workers() -> None:
    text = (REPO / "supervisord.conf").read_text()
    assert render_supervisord_conf(text, 1) == text
    rendered = render_supervisord_conf(text, 4)
    parser = configparser.RawConfigParser()
    parser.read_string(rendered)
    proxy = parser["program:proxy"]
    assert proxy["numprocs"] == "4" and proxy["process_name"] == "proxy-%(process_num)d"
    assert proxy["command"].endswith("run proxy --worker %(process_num)d")
    assert proxy["stdout_logfile"].endswith("/proxy-%(process_num)d.log")
    assert parser["program:api"]["command"] == parser["program:api"]["command"]  # other programs unchanged
    assert rendered.count("[program:") == text.count("[program:")


def test_merge_sums_counts_and_joins_lists() -> None:
    a = {"active_connections": 3, "waiting": 1, "tunnels": 2, "allowall": {"active": False}}
    b = {"active_connections": 4, "waiting": 5, "tunnels": 0, "allowall": {"active": False}}
    out = merge("stats", [a, b])
    assert (out["active_connections"], out["waiting"], out["tunnels"], out["proxies"]) == (7, 6, 2, 2)
    w = merge("waiters", [{"waiters": [{"host": "x", "count": 1}]}, {"waiters": [{"host": "x", "count": 2}]}])
    assert [e["count"] for e in w["waiters"]] == [1, 2]
    assert merge("holds.block", [{"blocked": 2}, {"blocked": 3}]) == {"blocked": 5}
    assert merge("cert.reload", [{"message": "unchanged"}, {"message": "reloaded"}]) == {"message": "reloaded"}
    assert merge("allowall.get", [{"active": True}, {"active": True}]) == {"active": True}


def test_group_calls_every_proxy_and_survives_a_down_one(tmp_path) -> None:
    import asyncio

    from bus.reqrep import ControlServer, RemoteError, ServiceUnavailable
    from services.api.proxies import ProxyGroup

    async def go() -> None:
        eps = [f"ipc://{tmp_path}/w{i}.sock" for i in range(3)]

        def refuse(args):
            raise RemoteError("mode must be allow or deny", 400)

        servers = [
            ControlServer(ep, {"stats": lambda args, n=n: {"waiting": n + 1}, "allowall.set": refuse})
            for n, ep in enumerate(eps[:2])
        ]  # the third worker is down
        tasks = [asyncio.ensure_future(s.serve()) for s in servers]
        group = ProxyGroup(eps, 0.3, 1, lambda: 3.0)
        try:
            assert (await group.call("stats"))["waiting"] == 3  # 1 + 2; the down one does not count
            with pytest.raises(RemoteError):
                await group.call("allowall.set", {"mode": "x"})
            group.note_heartbeat("proxy-b", {"role": "proxy", "control": f"ipc://{tmp_path}/remote.sock"})
            assert len(group.endpoints()) == 4
            down = ProxyGroup([eps[2]], 0.2, 1, lambda: 3.0)
            with pytest.raises(ServiceUnavailable):
                await down.call("stats")
            down.close()
        finally:
            group.close()
            for t in tasks:
                t.cancel()
            for s in servers:
                s.close()

    asyncio.run(go())


def test_metrics_sum_the_workers_figures() -> None:
    from greyproxy.metrics import sum_stats

    a = {
        "active_connections": 2,
        "rules": 5,
        "journal": {"acked": 10},
        "metrics": {"decision_seconds": {"le": [0.1, 1], "cumulative": [1, 2, 3], "sum": 0.5}},
    }
    b = {
        "active_connections": 3,
        "rules": 5,
        "journal": {"acked": 7},
        "metrics": {"decision_seconds": {"le": [0.1, 1], "cumulative": [0, 4, 4], "sum": 1.0}},
    }
    out = sum_stats([a, b])
    assert out["active_connections"] == 5 and out["rules"] == 5 and out["journal"]["acked"] == 17
    assert out["metrics"]["decision_seconds"] == {"le": [0.1, 1], "cumulative": [1, 6, 7], "sum": 1.5}
