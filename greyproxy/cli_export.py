"""`greyproxy export --har FILE [filters]`: the captured transactions as HAR 1.2, through the API.

The document is streamed from `GET /api/transactions/export.har` into FILE.part and renamed to
FILE once complete, so FILE is either the whole export or not there; `-` writes to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli import EXTRA_COMMANDS, _add_config_args, _load

FILTERS = ("container", "destination", "method", "session_id", "conversation_id", "from_date", "to_date")


def cmd_export(args: argparse.Namespace) -> int:
    import httpx

    cfg = _load(args)
    url = f"{cfg.api_base()}/api/transactions/export.har"
    params = {name: getattr(args, name) for name in FILTERS if getattr(args, name)}
    target = args.har
    out_path = None if target == "-" else Path(target)
    part = out_path.with_name(out_path.name + ".part") if out_path else None
    written = 0
    try:
        with httpx.stream("GET", url, params=params, timeout=httpx.Timeout(30.0, read=300.0), trust_env=False) as r:
            if r.status_code != 200:
                r.read()
                try:
                    message = r.json().get("error", r.text)
                except ValueError:
                    message = r.text
                print(f"greyproxy: export failed ({r.status_code}): {message}", file=sys.stderr)
                return 1
            sink = open(part, "wb") if part else sys.stdout.buffer  # noqa: SIM115 - closed below
            try:
                for chunk in r.iter_bytes():
                    sink.write(chunk)
                    written += len(chunk)
            finally:
                if part:
                    sink.close()
                else:
                    sink.flush()
    except httpx.HTTPError as exc:
        print(f"greyproxy: cannot read the export from {url}: {exc}", file=sys.stderr)
        if part:
            part.unlink(missing_ok=True)
        return 1
    except OSError as exc:
        print(f"greyproxy: cannot write {part}: {exc.strerror or exc}", file=sys.stderr)
        if part:
            part.unlink(missing_ok=True)
        return 1
    if part and out_path:
        os.replace(part, out_path)
        print(f"wrote {out_path} ({written} bytes, HAR 1.2)", file=sys.stderr)
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Export captured transactions (filters as GET /api/transactions)."
    parser.add_argument("--har", metavar="FILE", required=True, help="write HAR 1.2 to FILE ('-' for stdout)")
    parser.add_argument("--container", help="substring of the container name (as the list's ?container=)")
    parser.add_argument("--destination", help="substring of the destination host")
    parser.add_argument("--method", help="HTTP method (or WS_REQ / WS_RESP)")
    parser.add_argument("--session-id", dest="session_id")
    parser.add_argument("--conversation-id", dest="conversation_id")
    parser.add_argument("--from", dest="from_date", metavar="TIME", help="RFC 3339 or YYYY-MM-DDTHH:MM (UTC)")
    parser.add_argument("--to", dest="to_date", metavar="TIME")
    _add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    return cmd_export(args)


EXTRA_COMMANDS["export"] = (configure, run, "export captured transactions (HAR)")
