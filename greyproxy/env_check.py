"""`greyproxy env --check`: one request with each runtime present, under `greyproxy env`'s variables.

A runtime "works" when its request got an answer from the destination through the proxy with
the CA trusted. Then the API is asked which of those requests were recorded as transactions
(matched by each runtime's User-Agent), which tells interception apart from a plain tunnel.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .timeutil import rfc3339

# Node before 24 does not read the proxy variables itself. An http:// URL goes to HTTP_PROXY as an
# absolute-form GET (as python and curl send it); an https:// one CONNECTs through HTTPS_PROXY by
# hand, then TLS with Node's own trust store (which NODE_EXTRA_CA_CERTS extends). No global agent
# (`agent: false`, or `createConnection`): Node 24's (NODE_USE_ENV_PROXY) would proxy the requests
# to the proxy.
# Prints what `_answer_judge` reads: the status line, X-Greyproxy-Reason, the start of the body.
NODE_SCRIPT = r"""
const http = require('http'), https = require('https'), tls = require('tls'), net = require('net');
const target = new URL(process.argv[1]);
const plain = target.protocol === 'http:';
const name = plain ? 'HTTP_PROXY' : 'HTTPS_PROXY';
const p = process.env[name] || process.env[name.toLowerCase()];
if (!p) { console.error(name + ' is not set'); process.exit(2); }
const proxy = new URL(p);
const host = target.hostname.replace(/^\[|\]$/g, '');
const authority = `${target.hostname}:${target.port || (plain ? 80 : 443)}`;
const ua = `greyproxy-env-check node/${process.versions.node}`;
const auth = {};
if (proxy.username) auth['proxy-authorization'] = 'Basic ' +
  Buffer.from(decodeURIComponent(proxy.username) + ':' + decodeURIComponent(proxy.password)).toString('base64');
const via = {host: proxy.hostname.replace(/^\[|\]$/g, ''), port: proxy.port || 80, agent: false};
const answer = (res) => {
  let body = Buffer.alloc(0), done = false;
  const say = () => {
    if (done) return;
    done = true;
    process.stdout.write(`HTTP/${res.httpVersion} ${res.statusCode} ${res.statusMessage}\n` +
      `${res.headers['x-greyproxy-reason'] || ''}\n${body.subarray(0, 200).toString('utf8')}`, () => process.exit(0));
  };
  res.on('data', (d) => { body = Buffer.concat([body, d]); if (body.length >= 200) say(); });
  res.on('end', say);
  res.on('error', say);
};
if (plain) {
  const req = http.request({...via, method: 'GET', path: target.href,
                            headers: {host: target.host, 'user-agent': ua, connection: 'close', ...auth}}, answer);
  req.on('error', (e) => { console.error('proxy: ' + e.message); process.exit(1); });
  req.end();
} else {
  const req = http.request({...via, method: 'CONNECT', path: authority, headers: {host: authority, ...auth}});
  req.on('error', (e) => { console.error('proxy: ' + e.message); process.exit(1); });
  req.on('connect', (res, socket) => {
    if (res.statusCode !== 200) { console.error('the proxy answered CONNECT with ' + res.statusCode); process.exit(1); }
    const opts = {socket, host};
    if (!net.isIP(host)) opts.servername = host;
    const s = tls.connect(opts);
    s.on('error', (e) => { console.error('TLS: ' + e.message); process.exit(1); });
    const get = https.request({host, path: `${target.pathname}${target.search}`, createConnection: () => s,
                               headers: {host: target.host, 'user-agent': ua, connection: 'close'}}, answer);
    get.on('error', (e) => { console.error('TLS: ' + e.message); process.exit(1); });
    get.end();
  });
  req.end();
}
"""

# Prints what `_answer_judge` reads: the status, X-Greyproxy-Reason, the start of the body.
PYTHON_SCRIPT = r"""
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
except urllib.error.HTTPError as e:
    r = e
try:
    body = r.read(200)
except Exception:
    body = b""
print(r.status or r.code)
print(r.headers.get("X-Greyproxy-Reason", "") if r.headers else "")
sys.stdout.flush()
sys.stdout.buffer.write(body)
"""

# How the body of an answer of the proxy's own starts (services/proxy: its 403, 502, 504, 400, 429,
# 503, 407, and SPEC §7's per-request deny), besides the X-Greyproxy-Reason its refusals carry (which
# curl before 7.84 cannot print): such an answer says the request did not get through, whatever
# its status.
_PROXY_OWN = ("Greyproxy: ", "Blocked by Greyproxy", "Request denied by proxy")
_BODY_START = 200


@dataclass
class Runtime:
    name: str
    binary: str  # looked up on PATH
    argv: Callable[[str, argparse.Namespace, Path], list[str]]
    user_agent: re.Pattern  # how its requests show in the transactions
    judge: Callable[[int, str, str], tuple[bool, str]] | None = None  # (code, stdout, stderr) -> (ok, detail)
    # A file (in the check's directory) it writes the answer's body to: its start follows stdout
    # for the judge.
    body_file: str | None = None


@dataclass
class Result:
    name: str
    present: bool
    ok: bool = False
    detail: str = ""
    recorded: bool | None = None  # None: not known (the API could not be asked)
    extra: dict = field(default_factory=dict)


# Lines a runtime ends its error output with that say nothing about the error (npm's pointer to its
# debug log): the line before is the one that says what went wrong.
_NOISE = re.compile(r"A complete log of this run can be found in|^npm (error|ERR!)\s*$")
# npm's line that names the failed request ("npm error 403 403 Forbidden - GET https://…"), else its
# error code line: its general advice comes after them.
_NPM_SAYS = (re.compile(r"^npm (error|ERR!) .* - (GET|PUT|POST|HEAD) "), re.compile(r"^npm (error|ERR!) code "))


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not _NOISE.search(ln.strip())]
    return lines[-1][:300] if lines else ""


def _default_judge(code: int, out: str, err: str) -> tuple[bool, str]:
    if code == 0:
        return True, _last_line(out) or "ok"
    return False, _last_line(err) or _last_line(out) or f"exit code {code}"


def proxy_answer(reason: str, body: str) -> str | None:
    """What the proxy said when an answer (its X-Greyproxy-Reason value, the start of its body) is
    the proxy's own rather than the destination's, else None."""
    first = body.strip().splitlines()[0][:_BODY_START] if body.strip() else ""
    if first.startswith(_PROXY_OWN):
        return first
    if reason:
        return f"{first} (X-Greyproxy-Reason: {reason})" if first else f"X-Greyproxy-Reason: {reason}"
    return None


def _answer_judge(code: int, out: str, err: str) -> tuple[bool, str]:
    """python, node and curl print the status, the X-Greyproxy-Reason value and the start of the
    body: an answer works when it came from the destination (whatever its status), not when the
    proxy answered in its place (a refusal, or a 502 because the destination could not be reached
    or spoke another protocol)."""
    if code != 0:
        return _default_judge(code, out, err)
    status, _, rest = out.partition("\n")
    reason, _, body = rest.partition("\n")
    reason = reason.strip()
    if "%header{" in reason:  # curl before 7.84 prints a `-w` variable it does not know as written
        reason = ""  # (the body's start still tells the proxy's own answers)
    own = proxy_answer(reason, body)
    if own is not None:
        return False, f"{status.strip()} from Greyproxy, not from the destination: {own}"
    return True, status.strip() or "ok"


def _git_judge(code: int, out: str, err: str) -> tuple[bool, str]:
    if code == 0:
        return True, f"{len(out.splitlines())} refs"
    # The destination answered (over TLS, through the proxy) that this is no repository: the
    # transport works; only the URL is not a git repository.
    if re.search(r"repository '.*' not found|not valid: is this a git repository|returned error: 404", err):
        return True, "reached the server (not a git repository there: --check-git URL names one)"
    return False, _last_line(err) or f"exit code {code}"


def _npm_judge(code: int, out: str, err: str) -> tuple[bool, str]:
    if code != 0:
        lines = [ln.strip() for ln in err.splitlines()]
        for says in _NPM_SAYS:
            hit = next((ln for ln in lines if says.search(ln)), None)
            if hit:
                return False, hit[:300]
    return _default_judge(code, out, err)


def _pip_judge(code: int, out: str, err: str) -> tuple[bool, str]:
    if code == 0:  # "pip (24.0)" first, then the list of versions
        return True, out.strip().splitlines()[0][:300] if out.strip() else "ok"
    return _default_judge(code, out, err)


def _pip_binary() -> str:
    return "pip" if shutil.which("pip") else "pip3"


RUNTIMES = (
    Runtime(
        "python",
        "python3",
        lambda url, a, tmp: ["python3", "-c", PYTHON_SCRIPT, url, str(a.check_timeout)],
        re.compile(r"^Python-urllib/"),
        _answer_judge,
    ),
    Runtime(
        "pip",
        "pip",
        lambda url, a, tmp: [
            _pip_binary(),
            "index",
            "versions",
            "pip",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "--retries",
            "0",
            "--timeout",
            str(int(a.check_timeout)),
        ],
        re.compile(r"^pip/"),
        _pip_judge,
    ),
    Runtime(
        "node",
        "node",
        lambda url, a, tmp: ["node", "-e", NODE_SCRIPT, url],
        re.compile(r"^greyproxy-env-check node/"),
        _answer_judge,
    ),
    Runtime(
        "npm",
        "npm",
        lambda url, a, tmp: [
            "npm",
            "view",
            "npm",
            "version",
            "--prefer-online",
            "--cache",
            str(tmp / "npm-cache"),
            "--no-update-notifier",
            "--fetch-retries",
            "0",
        ],
        re.compile(r"^npm/"),
        _npm_judge,
    ),
    Runtime(
        "curl",
        "curl",
        lambda url, a, tmp: [
            "curl",
            "-sS",
            "-o",
            str(tmp / "curl-body"),
            "-w",
            "%{http_code}\n%header{x-greyproxy-reason}\n",  # (%header: curl 7.84+; the body says it too)
            "--max-time",
            str(a.check_timeout),
            url,
        ],
        re.compile(r"^curl/"),
        _answer_judge,
        body_file="curl-body",
    ),
    Runtime(
        "git", "git", lambda url, a, tmp: ["git", "ls-remote", a.check_git or url], re.compile(r"^git/"), _git_judge
    ),
)


def _present(rt: Runtime) -> bool:
    if rt.name == "pip":
        return bool(shutil.which("pip") or shutil.which("pip3"))
    return shutil.which(rt.binary) is not None


def run_runtime(rt: Runtime, env: dict[str, str], args: argparse.Namespace, tmp: Path) -> Result:
    if not _present(rt):
        return Result(rt.name, present=False, detail="not installed")
    argv = rt.argv(args.check_url, args, tmp)
    try:
        proc = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",  # (the start of a body is printed as it came)
            timeout=args.check_timeout + 5,
            stdin=subprocess.DEVNULL,
            cwd=str(tmp),
        )
    except subprocess.TimeoutExpired:
        return Result(rt.name, present=True, detail=f"no answer within {args.check_timeout:g} s")
    except OSError as exc:
        return Result(rt.name, present=True, detail=f"cannot run {argv[0]}: {exc.strerror or exc}")
    out = proc.stdout
    if rt.body_file is not None:
        try:
            with open(tmp / rt.body_file, "rb") as f:
                out += f.read(_BODY_START).decode("utf-8", "replace")
        except OSError:  # (no answer, so no body)
            pass
    ok, detail = (rt.judge or _default_judge)(proc.returncode, out, proc.stderr)
    return Result(rt.name, present=True, ok=ok, detail=detail)


def _query(container: str | None, since: float | None = None, **extra: str | int) -> dict[str, str | int]:
    """An API listing's query: `extra`, the check's identity, and entries from a second before
    `since` on (the API's times are whole seconds)."""
    params: dict[str, str | int] = dict(extra)
    if since is not None:
        params["from_date"] = rfc3339(since - 1) or ""
    if container:
        params["container"] = container
    return params


def _items(url: str, params: dict[str, str | int], timeout: float = 5.0) -> list[dict]:
    """A listing's `items` (httpx.HTTPError or ValueError when the API cannot say)."""
    import httpx

    r = httpx.get(url, params=params, timeout=timeout, trust_env=False)
    r.raise_for_status()
    return r.json().get("items", [])


def _recorded(cfg: Config, container: str | None, since: float, results: list[Result]) -> str | None:
    """Mark which working runtimes' requests were recorded; an error line when the API cannot say."""
    import httpx

    want = {r.name for r in results if r.ok}
    if not want:
        return None
    by_name = {rt.name: rt for rt in RUNTIMES}
    params = _query(container, since, limit=1000)
    try:
        url = f"{cfg.api_base()}/api/transactions"
    except Exception as exc:  # noqa: BLE001 - API disabled: the check still reports the runtimes
        return str(exc)
    seen: set[str] = set()
    deadline = time.monotonic() + 5.0  # records reach the database a moment after the answer
    while True:
        try:
            items = _items(url, params)
        except (httpx.HTTPError, ValueError) as exc:
            return f"cannot ask the API at {url}: {exc}"
        for item in items:
            headers = item.get("request_headers") or {}
            ua = next((v for k, v in headers.items() if k.lower() == "user-agent"), "")
            ua = ua[0] if isinstance(ua, list) and ua else ua
            for name in want:
                if isinstance(ua, str) and by_name[name].user_agent.search(ua):
                    seen.add(name)
        if seen >= want or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    for res in results:
        if res.ok:
            res.recorded = res.name in seen
    return None


# What a blocked log entry's reason means, for the person reading the check (SPEC §5 reasons).
_WHY = {
    "hold_timeout": "held for approval, and nobody answered in time",
    "dismissed": "held for approval, then dismissed",
    "default_deny": "no rule allows it (default deny)",
    "silent_deny": "silent mode denies what no rule allows",
    "queue_full": "the pending queue is full",
    "guard": "it is one of Greyproxy's own listeners",
}


def how_to_allow(pid: int, base: str) -> str:
    """Where a person decides pending entry `pid` (`base`: the API's URL)."""
    return f"allow it in the dashboard, {base}/?pending={pid}, or curl --noproxy '*' -X POST {base}/api/pending/{pid}/allow"


def blocked_lines(logs: list[dict], pending: list[dict], container: str | None, base: str) -> list[str]:
    """The destinations the gate refused during the check, one line each (oldest first, each once),
    with why and what to do: the pending entry to allow, or the rule that denies."""
    waiting = {(p.get("container_name"), p.get("destination_host"), p.get("destination_port")): p for p in pending}
    out: list[str] = []
    seen: set[tuple[object, object]] = set()
    for entry in reversed(logs):  # (the API lists newest first)
        if entry.get("result") != "blocked" or (container and entry.get("container_name") != container):
            continue
        key = (entry.get("destination_host"), entry.get("destination_port"))
        if key in seen:
            continue
        seen.add(key)
        reason = entry.get("reason") or "blocked"
        if reason == "rule" and entry.get("rule_id") is not None:
            why = f"denied by rule {entry['rule_id']}"
            if entry.get("rule_summary"):
                why += f" ({entry['rule_summary']})"
        else:
            why = _WHY.get(reason, reason)
        p = waiting.get((entry.get("container_name"), *key))
        if p is not None:
            why += f"; pending #{p['id']}: {how_to_allow(p['id'], base)}"
        who = "" if container else f"{entry.get('container_name')}: "  # (no name given: whose it was)
        out.append(f"    {who}{key[0]}:{key[1]}  {why}")
    return out


def _blocked(cfg: Config, container: str | None, since: float, wait: float = 3.0) -> list[str]:
    """`blocked_lines` for the log entries written since `since` (nothing when the API cannot say).
    Asked again for up to `wait` seconds while there are none: entries reach the database a moment
    after the refusal."""
    deadline = time.monotonic() + wait
    while True:
        lines = _blocked_once(cfg, container, since)
        if lines is None or lines or time.monotonic() > deadline:
            return lines or []
        time.sleep(0.25)


def _blocked_once(cfg: Config, container: str | None, since: float) -> list[str] | None:
    try:
        base = cfg.api_base()
        logs = _items(f"{base}/api/logs", _query(container, since, result="blocked", limit=200))
        pending = _items(f"{base}/api/pending", _query(container, limit=1000))
        return blocked_lines(logs, pending, container, base)
    except Exception:  # noqa: BLE001 - the API disabled or away: the check still reports the runtimes
        return None


class PendingWatch(threading.Thread):
    """While the runtimes run: each destination of theirs that waits for a person's decision is
    announced on stderr at once (where, its pending id, how to decide), so a first check on a fresh
    stack is not a silent wait of `holdTimeout` seconds."""

    POLL = 0.5

    def __init__(self, cfg: Config, container: str | None, since: float) -> None:
        super().__init__(name="pending-watch", daemon=True)
        self.cfg, self.container, self.since = cfg, container, since
        self.done = threading.Event()
        self.announced: set[int] = set()

    def run(self) -> None:
        import httpx

        try:
            base = self.cfg.api_base()
        except Exception:  # noqa: BLE001 - the API is disabled: nothing to watch
            return
        params = _query(self.container, limit=100)
        after = rfc3339(self.since - 1) or ""
        while not self.done.wait(self.POLL):
            try:
                items = _items(f"{base}/api/pending", params, timeout=2.0)
            except (httpx.HTTPError, ValueError):
                continue
            for item in reversed(items):  # (newest last_seen first: announced oldest first)
                if not self._ours(item, after):
                    continue
                self.announced.add(item["id"])
                print(announce_pending(item, base), file=sys.stderr, flush=True)

    def _ours(self, item: dict, after: str) -> bool:
        if item.get("id") in self.announced or not item.get("waiting") or str(item.get("last_seen", "")) < after:
            return False
        name = str(item.get("container_name", ""))
        return name == self.container if self.container else name.startswith("unknown-")


def announce_pending(item: dict, base: str) -> str:
    """The line that tells the person at the terminal a check's destination waits for them."""
    pid = item["id"]
    where = f"{item['destination_host']}:{item['destination_port']}"
    return f"greyproxy env --check: {where} waits for a decision (pending #{pid}): {how_to_allow(pid, base)}"


def proxy_away(env: dict[str, str]) -> str | None:
    """Why the proxy the variables name cannot be reached (nothing listens there), else None."""
    import socket
    from urllib.parse import urlsplit

    url = env.get("HTTPS_PROXY") or env.get("https_proxy") or env.get("HTTP_PROXY") or env.get("http_proxy")
    if not url:
        return "no HTTPS_PROXY or HTTP_PROXY is set"
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3.0).close()
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"nothing answers at {where}, the proxy these variables name ({exc.strerror or exc})"
    return None


def run_checks(cfg: Config, plan, container: str | None, args: argparse.Namespace) -> int:  # noqa: ANN001
    from .cli_env import environ_with

    env = environ_with(plan)
    away = proxy_away(env)
    if away is not None:  # (each runtime would fail alike, each in its own words)
        # A proxy on another host (rulesFrom: recorder) runs alone; here, the whole stack.
        start = "greyproxy run proxy" if cfg.section("proxy")["rulesFrom"] == "recorder" else "greyproxy serve"
        if getattr(args, "config", None):
            start += f" -C {shlex.quote(str(args.config))}"
        print(f"greyproxy env --check: {away}: is Greyproxy running? Start it: {start}", file=sys.stderr)
        return 1
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("npm_config_update_notifier", "false")
    since = time.time()
    watch = PendingWatch(cfg, container, since)
    # The runtimes at once: each may be held for a decision (holdTimeout), and one decision
    # releases every runtime waiting on that destination.
    with tempfile.TemporaryDirectory(prefix="greyproxy-check-") as tmp:
        watch.start()
        try:
            with ThreadPoolExecutor(max_workers=len(RUNTIMES), thread_name_prefix="check") as pool:
                results = list(pool.map(lambda rt: run_runtime(rt, env, args, Path(tmp)), RUNTIMES))
        finally:
            watch.done.set()
            watch.join(timeout=5)
    problem = _recorded(cfg, container, since, results)
    who = container or "unknown-<source ip>"
    print(f"greyproxy env --check: identity {who}, {args.check_url}")
    for res in results:
        if not res.present:
            status = "absent"
        elif not res.ok:
            status = "FAILS"
        elif res.recorded is False:
            status = "works, not intercepted"
        else:
            status = "works"
        suffix = "" if res.recorded is None or not res.ok else (" (recorded)" if res.recorded else "")
        print(f"  {res.name:<7} {status}{suffix}: {res.detail}")
    if problem:
        print(f"  (whether requests were recorded is unknown: {problem})")
    failed = [r.name for r in results if r.present and not r.ok]
    blocked = _blocked(cfg, container, since) if failed else []
    if blocked:
        print("  blocked by Greyproxy during the check:")
        print("\n".join(blocked))
        print(f"  (greyproxy explain {container or 'NAME'} HOST:PORT says which rules match)")
    if failed:
        print(f"greyproxy env --check: {', '.join(failed)} did not get through", file=sys.stderr)
    return 1 if failed else 0
