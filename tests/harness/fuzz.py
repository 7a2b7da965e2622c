"""How hard the property tests (hypothesis) try: `HYPOTHESIS_PROFILE` picks the profile.

- unset / ``default``: the everyday run (``make test``, the unit run): each test runs a quarter
  of the examples it names (at least 25, or all of them when it names fewer), tests naming none
  run 25.
- ``ci-deep``: the thorough run, every test with the examples it names (100 where it names
  none): ``HYPOTHESIS_PROFILE=ci-deep make test PYTEST_ARGS='-m "not stack"'``.

tests/conftest.py registers both profiles and loads the one named. A test says how many
examples it wants in the thorough run with ``@settings(max_examples=examples(400), ...)``.
"""

from __future__ import annotations

import os

from hypothesis import settings

DEEP = "ci-deep"
PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or "default"
DEFAULT_SHARE = 4  # the everyday run tries 1/DEFAULT_SHARE of the thorough run's examples
DEFAULT_FLOOR = 25


def examples(n: int, profile: str | None = None) -> int:
    """max_examples for a test that wants `n` in the thorough run, under `profile` (the loaded one)."""
    if (profile or PROFILE) == DEEP:
        return n
    return min(n, max(DEFAULT_FLOOR, n // DEFAULT_SHARE))


def register_profiles() -> None:
    """Register ``default`` and ``ci-deep`` and load the one HYPOTHESIS_PROFILE names."""
    settings.register_profile("default", max_examples=examples(100, "default"))
    settings.register_profile(DEEP, max_examples=100)
    settings.load_profile(PROFILE)
