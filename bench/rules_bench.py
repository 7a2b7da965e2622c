#!/usr/bin/env python3
"""Decision latency of RuleSet with large mixed rule sets.

    python bench/rules_bench.py [--rules 100,10000,100000] [--queries 20000] [--seed 1]

For each size it builds a rule set mixing exact hosts, ``*.suffix``, ``**.suffix``,
CIDRs, ``api.*``-style globs (plus a handful of unindexable ``*x*`` globs), ``*``
destinations, exact/glob/``*`` containers, port lists and ranges, some expired
rules and every source layer; then it times ``RuleSet.decide`` one call at a
time for queries that hit a rule and for queries that match nothing, and prints
the median and p99 in microseconds. Target: median ≤ 20 µs at 10 000 rules.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from greyproxy.policy import Rule, RuleSet

NOW = time.time()
Query = tuple[str, str, int]


def make_rules(n: int, rng: random.Random) -> list[Rule]:
    """n rules with a realistic-ish mix; ids 1..n."""
    containers = max(10, n // 50)  # roughly 50 rules per agent
    rules: list[Rule] = []
    for i in range(1, n + 1):
        roll = rng.random()
        c = rng.randrange(containers)
        container = f"agent{c}" if roll < 0.5 else f"team{c}/*" if roll < 0.8 else "*"
        kind = rng.random()
        if kind < 0.40:
            dest = f"svc{i}.example{i % 97}.com"
        elif kind < 0.60:
            dest = f"*.d{i}.net"
        elif kind < 0.75:
            dest = f"**.d{i}.org"
        elif kind < 0.85:
            plen = rng.choice((8, 16, 24, 28, 32))
            octets = [rng.randrange(1, 224)] + [rng.randrange(256) for _ in range(3)]
            dest = ".".join(map(str, octets)) + f"/{plen}"
        elif kind < 0.87:
            dest = f"2001:db8:{i % 65536:x}::/48"
        elif kind < 0.93:
            dest = f"api{i}.*"
        elif kind < 0.97:
            dest = f"*-cdn{i}.example.net"
        elif kind < 0.99:
            dest = f"host{i}.example.io"
        else:
            dest = "*"
            container = f"agent{c}"  # '*' → '*' would match every request and hide the misses
        p = rng.random()
        port = "*" if p < 0.4 else "443" if p < 0.7 else "80,443" if p < 0.9 else "8000-8999"
        action = "deny" if rng.random() < 0.2 else "allow"
        source = rng.choices(("global", "session", "builtin"), (0.9, 0.08, 0.02))[0]
        expires = None if rng.random() < 0.8 else NOW + rng.choice((-3600, 3600, 86400))
        rules.append(Rule(i, container, dest, port, action, source, expires))
    # A few globs with no literal prefix or suffix: scanned linearly, and as rare as in real life.
    for k in range(5):
        rules.append(Rule(n + k + 1, "*", f"*tracker{k}*", "*", "deny"))
    return rules


def hit_query(rule: Rule, rng: random.Random) -> Query:
    """A request the given rule matches (it may still lose to a better rule)."""
    cp = rule.container_pattern
    container = cp if "*" not in cp else cp.replace("*", "worker") if cp != "*" else "anyone"
    d = rule.destination_pattern
    if d.startswith("**."):
        host = rng.choice(("", "www.", "a.b.")) + d[3:]
    elif d.startswith("*."):
        host = rng.choice(("www.", "a.b.")) + d[2:]
    elif d.endswith(".*"):
        host = d[:-1] + "github.com"
    elif d.startswith("*-"):
        host = "eu" + d[1:]
    elif "/" in d and ":" in d:
        host = d.split("/")[0] + "1"
    elif "/" in d:
        host = d.split("/")[0]
    elif d == "*":
        host = f"random{rng.randrange(10**6)}.example.com"
    else:
        host = d
    pp = rule.port_pattern
    port = 443 if pp in ("*", "443", "80,443") else 8080
    return container, host, port


def miss_query(i: int, rng: random.Random) -> Query:
    """A request no rule matches: unknown names, unknown IPs, unknown containers."""
    choice = i % 3
    if choice == 0:
        return f"stranger{i}", f"x{i}.unknown{i % 50}.io", 443
    if choice == 1:
        return f"stranger{i}", f"deep.sub.domain{i}.nowhere.example", 8443
    return (
        f"stranger{i}",
        f"240.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
        443,
    )


def time_queries(rs: RuleSet, queries: list[Query]) -> list[float]:
    """Per-call wall time in µs (each call timed on its own so p99 is meaningful)."""
    clock = time.perf_counter_ns
    decide = rs.decide
    samples: list[float] = []
    for container, host, port in queries:
        t0 = clock()
        decide(container, host, port, None, NOW)
        samples.append((clock() - t0) / 1000.0)
    return samples


def summarise(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default="100,10000,100000", help="comma list of rule-set sizes")
    ap.add_argument("--queries", type=int, default=20000, help="queries per kind per size")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.rules.split(",") if s.strip()]

    print(f"{'rules':>8} {'build ms':>9} {'hit med µs':>11} {'hit p99 µs':>11} "
          f"{'miss med µs':>12} {'miss p99 µs':>12} {'hit rate':>9}")  # fmt: skip
    for n in sizes:
        rng = random.Random(args.seed)
        rules = make_rules(n, rng)
        t0 = time.perf_counter()
        rs = RuleSet(rules)
        build_ms = (time.perf_counter() - t0) * 1000
        hits = [hit_query(rng.choice(rules), rng) for _ in range(args.queries)]
        misses = [miss_query(i, rng) for i in range(args.queries)]
        time_queries(rs, hits[:2000] + misses[:2000])  # warm caches and the allocator
        hit_samples = time_queries(rs, hits)
        miss_samples = time_queries(rs, misses)
        decided = sum(rs.decide(c, h, p, None, NOW).rule is not None for c, h, p in hits)
        wrongly = sum(rs.decide(c, h, p, None, NOW).rule is not None for c, h, p in misses)
        if wrongly:
            print(f"warning: {wrongly} 'miss' queries matched a rule", file=sys.stderr)
        hm, hp = summarise(hit_samples)
        mm, mp = summarise(miss_samples)
        print(f"{n:>8} {build_ms:>9.0f} {hm:>11.2f} {hp:>11.2f} {mm:>12.2f} {mp:>12.2f} "
              f"{decided / len(hits):>9.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
