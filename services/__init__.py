"""The Greyproxy service processes: proxy, api, recorder, maintenance."""

import greyproxy  # noqa: F401  (installs the finder of compiled modules first: greyproxy/compiled.py)
