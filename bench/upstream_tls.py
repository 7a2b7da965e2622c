"""The proxy's CPU per new upstream TLS connection of an intercepted tunnel, with and without the
resumption of the origin's last session (`mitm.Interceptor._upstream_tls` / `keep_session`).

nginx (bench/harness/origin.py, TLS 1.3, a trustme certificate for 127.0.0.1) is the origin, in its
own process; this process runs the interceptor's upstream side on uvloop: for each connection, a
TCP connect (`upstream.connect`), the verified TLS handshake, `GET /1k` and its answer, close. The
figure is this process's CPU (user + system, `getrusage`) per connection, in rounds that alternate
"resumed" (the kept session offered, kept as the proxy keeps it) and "full" (no session read, kept
or offered: the handshake as it was without resumption), so both see the same machine.

    .venv/bin/python bench/upstream_tls.py [--connections N] [--rounds R]

Needs nginx (bench/setup.sh system) and trustme (the dev extras).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness.origin import NginxOrigin, make_tls  # noqa: E402


class _Settings:
    def on_change(self, fn: Any) -> None:
        fn({"mitmEnabled": True})


class _Certs:
    leaves = None


async def one_round(port: int, ca_file: Path, n: int, resume: bool) -> tuple[float, int]:
    from services.proxy import upstream
    from services.proxy.context import Limits
    from services.proxy.gate import Verdict
    from services.proxy.mitm import Interceptor, Session
    from services.proxy.conn import Conn

    mitm = Interceptor(None, None, _Certs(), _Settings(), [], str(ca_file))  # type: ignore[arg-type]
    limits = Limits()
    verdict = Verdict(True, "rule", 1)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n):
        raw = await upstream.connect("127.0.0.1", port, 5.0, lambda ip, p: None)
        stream, err = await mitm._upstream_tls(raw, "127.0.0.1", port, limits)
        if stream is None:
            raise SystemExit(f"upstream TLS failed: {err}")
        stream.write(b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        while len(stream.buf) < 1024 or b"\r\n\r\n" not in stream.buf:
            if not await stream.read_more(5.0):
                raise SystemExit("the origin closed before its answer")
        if resume:  # (off: no session read nor kept, as before resumption)
            mitm.keep_session(Session("b", "127.0.0.1", port, "https", "127.0.0.1", verdict, Conn(), stream))  # type: ignore[arg-type]
        raw.close()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return cpu / n, mitm.counts.get("upstream_tls_resumed", 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="gp-upstls-"))
    tls = make_tls(work / "tls")
    if tls is None:
        print("upstream_tls: needs trustme (the dev extras)", file=sys.stderr)
        return 2
    origin = NginxOrigin(work / "origin", 1 << 20, tls).start()
    best: dict[bool, float] = {}
    try:
        for _ in range(args.rounds):
            for resume in (True, False):
                per, resumed = uvloop.run(one_round(origin.tls_port, tls.ca_pem, args.connections, resume))
                what = "resumed" if resume else "full   "
                print(f"  {what} {per * 1e6:7.1f} µs CPU per connection ({resumed} of {args.connections} resumed)")
                best[resume] = min(best.get(resume, 1e9), per)
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"best: full {best[False] * 1e6:.1f} µs, resumed {best[True] * 1e6:.1f} µs per connection")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
