"""Greyproxy: a local egress firewall for AI agents and sandboxes."""

from greyproxy.compiled import install as _install_compiled

__version__ = "0.1.0"

_install_compiled()  # the hot modules compiled with Cython, where built and unchanged (greyproxy/compiled.py)
