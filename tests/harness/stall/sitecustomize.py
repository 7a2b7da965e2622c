"""A stalled event loop on demand, for tests/integration/test_stall_restart.py.

Loaded by every Python process started with this folder first on PYTHONPATH; does something only
with GREYPROXY_TEST_STALL=1. Then SIGUSR2 runs `_stalled_by_the_test` on the main thread (where a
service's event loop runs: Python runs signal handlers there), which blocks it for 120 s as a
blocking call made by mistake on the loop would. Nothing else in the process changes.
"""

import os

if os.environ.get("GREYPROXY_TEST_STALL") == "1":
    import signal
    import time

    def _stalled_by_the_test(signum, frame):
        time.sleep(120)

    signal.signal(signal.SIGUSR2, _stalled_by_the_test)
