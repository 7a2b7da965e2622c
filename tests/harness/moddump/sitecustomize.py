"""Module dump for the idle-imports measure (bench/idle_rss.py, tests/integration/test_idle_imports.py).

Loaded by every Python process started with this folder first on PYTHONPATH. When the file named
by GREYPROXY_MODDUMP_TRIGGER appears, the process writes its argv and the names in sys.modules to
<that file's folder>/<pid>.json. A daemon thread polls for the file twice a second; nothing else
changes in the process (threading is imported by every service anyway; json only on the dump).
"""

import os

_trigger = os.environ.get("GREYPROXY_MODDUMP_TRIGGER")
if _trigger:
    import sys
    import threading
    import time

    def _watch(path: str = _trigger) -> None:
        out = os.path.join(os.path.dirname(path), f"{os.getpid()}.json")
        while not os.path.exists(path):
            time.sleep(0.5)
        import json

        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "argv": sys.argv, "modules": sorted(sys.modules)}, f)
        os.replace(tmp, out)

    threading.Thread(target=_watch, name="moddump", daemon=True).start()
