"""A request hook for the stack tests only, installed through GREYPROXY_TEST_REQUEST_HOOKS
(`hooks_for_tests:hooks`, with this folder on PYTHONPATH): it adds a header carrying a secret to
every request sent upstream, the way credential substitution puts a real key into a request."""

from __future__ import annotations

from services.proxy.hooks import Flow

SECRET = "sk-hook-secret-" + "9d4f" * 6
HEADER = "X-Hook-Secret"


class AddSecret:
    name = "test-add-secret"

    def __call__(self, flow: Flow) -> None:
        flow.set_header(HEADER, SECRET)
        return None


def hooks() -> list[AddSecret]:
    return [AddSecret()]
