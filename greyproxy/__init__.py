"""Greyproxy: a local egress firewall for AI agents and sandboxes."""

__version__ = "0.1.0"
