"""The suite's own rules: a module that starts processes carries the `stack` marker (so
`pytest -m "not stack"` stays the fast unit run), and no test depends on a tool it would skip without."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
STARTS_PROCESSES = re.compile(r"\b(Stack\(|make_stack|service_runner|run_service\()")


def _modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "harness" not in p.parts and p != Path(__file__).resolve())


def test_modules_that_start_processes_are_marked_stack() -> None:
    unmarked = [
        p.relative_to(TESTS)
        for p in _modules()
        if STARTS_PROCESSES.search(p.read_text()) and "pytest.mark.stack" not in p.read_text()
    ]
    assert unmarked == [], f"add `pytestmark = pytest.mark.stack` to {unmarked}"


def test_no_module_skips_for_want_of_dig() -> None:
    offenders = [p.relative_to(TESTS) for p in _modules() if 'which("dig")' in p.read_text()]
    assert offenders == [], f"drive DNS with dnspython instead of dig: {offenders}"
