"""The bus: an XSUB/XPUB broker, pub/sub helpers, req/rep control and the reliable journal."""

import greyproxy  # noqa: F401  (installs the finder of compiled modules first: greyproxy/compiled.py)
