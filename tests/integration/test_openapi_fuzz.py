"""Schemathesis against the real stack: every operation of /api/openapi.json, generated inputs.

For each operation, positive cases (valid by the document) and negative ones (invalid by it)
are sent with `requests` to a real stack under a path prefix. What must hold:

- no 5xx, ever (SPEC: "never a 500 for bad input");
- every status, content type, header and JSON body the API answers is the one the document
  describes for that operation (so the document cannot drift from the code);
- input the document calls invalid is refused with a 4xx.

No operation is excluded: none hangs (proxy nudges are bounded, /ws answers a plain GET with
426) and the stack is private, so deleting builtin rules, generating a CA or switching silent
mode on cannot hurt anything. (Schemathesis itself leaves out GET /api/openapi.json, the
document it was loaded from; tests/unit/test_openapi.py covers that one.) A few connections
through the proxy first give the pending, log and stats operations real rows to return. Examples are derandomized (the same every run, no flaky
CI); GREYPROXY_FUZZ_EXAMPLES=200 and GREYPROXY_FUZZ_RANDOM=1 dig deeper when hunting bugs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import wait_for  # noqa: E402

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

EXAMPLES = int(os.environ.get("GREYPROXY_FUZZ_EXAMPLES", "25"))  # per operation and mode
RANDOM = os.environ.get("GREYPROXY_FUZZ_RANDOM") == "1"
PREFIX = "/gp"
SEED_HOST = "127.0.0.2"  # loopback, but no builtin rule covers it
MAX_FAILURES_PER_OPERATION = 3
# How invalid input may be refused: schemathesis' default list lacks 413 (a body past 4 MiB).
REJECTED = [400, 403, 404, 405, 409, 413, 415, 421, 422]
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Positive cases may still be refused (a pattern the schema cannot express, an unknown id): only
# conformance is checked. Negative cases must also be refused.
CHECKS = {GenerationMode.POSITIVE: CONFORMANCE, GenerationMode.NEGATIVE: [*CONFORMANCE, negative_data_rejection]}


def _describe(case: Any, exc: BaseException) -> str:
    try:
        curl = case.as_curl_command()
    except Exception:  # noqa: BLE001 - the failure matters more than its reproduction line
        curl = f"{case.method} {case.path}"
    return f"{type(exc).__name__}: {str(exc)[:1500]}\n    reproduce: {curl[:800]}"


def fuzz_operation(
    operation: Any, mode: GenerationMode, base_url: str, session: Any, examples: int
) -> tuple[int | None, list[str]]:
    """(cases sent, failure reports) for one operation in one generation mode; None cases: the
    operation has no input to make invalid (no negative case can exist)."""
    failures: list[str] = []
    sent = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        print_blob=False,
        report_multiple_bugs=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal sent
        if len(failures) >= MAX_FAILURES_PER_OPERATION:
            return
        sent += 1
        try:
            case.call_and_validate(base_url=base_url, session=session, checks=CHECKS[mode], timeout=15)
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected: every operation gets its turn
            failures.append(_describe(case, exc))

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        return None, failures  # nothing to make invalid (no parameters, no body): no negative cases
    return sent, failures


def seed_traffic(stack: Any) -> None:
    """A few held-then-blocked connections: pending entries (ids 1..n, which the document's examples
    use), log entries and stats for the operations to chew on."""
    proxy = f"http://fuzz@127.0.0.1:{stack.ports['http-proxy']}"

    def one(i: int) -> None:
        with httpx.Client(proxy=proxy, trust_env=False, timeout=10) as c:
            c.get(f"http://{SEED_HOST}:{9000 + i}/x")  # no rule covers it: held, then 403

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))
    wait_for(lambda: stack.get("/api/pending/count").json()["count"] >= 4, 10, message="pending entries")
    wait_for(lambda: stack.get("/api/logs").json()["total"] >= 4, 10, message="log entries")


def test_api_conforms_to_its_openapi_document(make_stack) -> None:
    stack = make_stack(greyproxy={"pathPrefix": PREFIX}, proxy={"holdTimeout": 1})
    base_url = stack.api  # http://127.0.0.1:PORT/gp
    seed_traffic(stack)
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment between us and the stack
    t0 = time.monotonic()
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTED}}}
    )  # not discover(): no stray schemathesis.toml may change the rules
    schema = schemathesis.openapi.from_url(f"{base_url}/api/openapi.json", config=config, timeout=10, proxies={})
    schema.validate()  # the document itself is valid OpenAPI 3.1

    report: list[str] = []
    operations = 0
    total = 0
    counts: dict[str, dict[str, int | None]] = {}  # operation -> {mode: cases sent}
    with session:
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                sent, failures = fuzz_operation(operation, mode, base_url, session, EXAMPLES)
                counts.setdefault(operation.label, {})[mode.value] = sent
                total += sent or 0
                report += [f"{operation.label} [{mode.value}] {f}" for f in failures]
    assert operations >= 30, f"only {operations} operations in the document"
    # What the docstring claims, per operation: positive cases for every one, negative cases for every
    # one with an input to make invalid, and those with inputs get more than a token case or two.
    no_positive = [label for label, c in counts.items() if not c["positive"]]
    assert not no_positive, f"operations without a positive case: {no_positive}"
    with_inputs = {label: c for label, c in counts.items() if c["negative"] is not None}
    no_negative = [label for label, c in with_inputs.items() if not c["negative"]]
    assert not no_negative, f"operations with inputs but no negative case: {no_negative}"
    assert len(with_inputs) >= operations // 2, counts
    want = min(EXAMPLES, 5)
    thin = {label: c for label, c in with_inputs.items() if (c["positive"] or 0) + (c["negative"] or 0) < want}
    assert not thin, f"operations with inputs but fewer than {want} cases: {thin}"
    health = stack.health()
    assert health[0] == 200, health  # the fuzzing took nothing down
    print(f"schemathesis: {operations} operations, {total} cases in {time.monotonic() - t0:.1f}s")
    assert not report, f"{len(report)} failures:\n\n" + "\n\n".join(report)
