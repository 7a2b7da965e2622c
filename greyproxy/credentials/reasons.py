"""Why the credential hook refused a request (SPEC §12.7): the `block_reason` values. A module of its
own so that the recorder can tell these rows apart without importing the substitution code (and, with
it, the policy package it does not otherwise use)."""

from __future__ import annotations

__all__ = ["CREDENTIALS_UNAVAILABLE", "HOST_MISMATCH", "IN_PATH", "PLAINTEXT", "REASONS", "UNKNOWN"]

UNKNOWN = "unknown_placeholder"
IN_PATH = "placeholder_in_path"
HOST_MISMATCH = "credential_host_mismatch"
PLAINTEXT = "plaintext_credential"
CREDENTIALS_UNAVAILABLE = "credentials_unavailable"
REASONS = (UNKNOWN, IN_PATH, HOST_MISMATCH, PLAINTEXT, CREDENTIALS_UNAVAILABLE)
