"""The LLM layer's scans of captured text run in linear time (SPEC §13): the text is the agent's to
choose, and a scan that backtracks holds the GIL, so the whole maintenance process (its event loop
included, and with it bus.stallTimeout's watchdog) waits for it.

Each linear form is checked against the plain regex it replaced, on random texts, and on a hostile
text the plain regex took seconds over. The time bounds are hundreds of times the linear cost and
far under the old one.
"""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from greyproxy.llm import assemble as A
from greyproxy.llm.rules import glob_match
from greyproxy.llm.text import tool_summary
from harness.fuzz import examples
from harness.util import best_time


# --------------------------------------------------------------------------- scaffolding tags

PLAIN_TAGS = {
    client: re.compile(rx.pattern + r".*?</\1>", re.S)  # the form used before: '<(names)>.*?</\1>'
    for client, rx in A._TAGS.items()
}
TAG_FRAGMENTS = [
    "<system-reminder>",
    "</system-reminder>",
    "<command-name>",
    "</command-name>",
    "<permissions>",
    "</permissions>",
    "<loaded_context>",
    "</loaded_context>",
    "x",
    "\n",
    "<",
    "</",
    ">",
]


@given(st.sampled_from(sorted(A._TAGS)), st.lists(st.sampled_from(TAG_FRAGMENTS), max_size=14).map("".join))
@settings(max_examples=examples(2000), deadline=None)
@example("claude-code", "<system-reminder>a<command-name>b</system-reminder>c</command-name>d")
@example("claude-code", "<system-reminder>a<system-reminder>b</system-reminder>c")
def test_tags_are_removed_as_the_plain_regex_removed_them(client: str, text: str) -> None:
    assert A._strip_tags(text, A._TAGS[client]) == PLAIN_TAGS[client].sub("", text)


def test_many_unclosed_tags_cost_linear_time() -> None:
    text = "<system-reminder>x" * 8000  # the plain regex: ~6 s here (16 000: 26 s)
    assert best_time(A._real_text, text, "claude-code") < 0.5
    assert A._real_text(text + "</system-reminder>tail", "claude-code") == "tail"


# --------------------------------------------------------------------------- endpoint rule globs


def _plain_glob(pattern: str, value: str, fold: bool) -> bool:
    body = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(body + r"\Z", re.S | (re.I if fold else 0)).match(value) is not None


@given(
    st.lists(st.sampled_from(["*", "/", "a", "B", ".", ":", "v1"]), min_size=1, max_size=8).map("".join),
    st.text(alphabet="/aAbB.:v1", max_size=14),
    st.booleans(),
)
@settings(max_examples=examples(2000), deadline=None)
def test_endpoint_globs_match_as_the_plain_regex_did(pattern: str, value: str, fold: bool) -> None:
    assert glob_match(pattern, value, fold) == _plain_glob(pattern, value, fold)


def test_endpoint_glob_with_many_stars_does_not_backtrack() -> None:
    # the plain form: 1.2 s for this 400-character path, ×8 for each doubling
    assert best_time(glob_match, "*/*/*/*:x", "/" * 400) < 0.005
    assert glob_match("*/*/*/*:x", "/" * 400 + ":x")


# --------------------------------------------------------------------------- apply_patch summaries


def test_apply_patch_file_name_with_a_long_run_of_blanks() -> None:
    patch = "*** Begin Patch\n*** Add File: src/app.py" + " " * 20000 + "\n+x\n*** End Patch"
    assert tool_summary("apply_patch", {"input": patch}) == "app.py"  # (the base name, as before)
    hostile = "*** Add File: a" + " " * 16000 + "x"  # '(.+?)\s*$': 1.7 s
    assert best_time(tool_summary, "apply_patch", {"input": hostile}) < 0.05
    assert tool_summary("apply_patch", {"input": "*** Update File: lib/x.go\r\n"}) == "x.go"
