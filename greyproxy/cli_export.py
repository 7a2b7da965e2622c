"""`greyproxy export --har FILE [filters]`: the captured transactions as HAR 1.2, through the API.

The document is streamed from `GET /api/transactions/export.har` into a temporary file beside FILE
(`.FILE.<random>.part`), checked, and renamed to FILE only once it is whole, so FILE is either the
whole export or not there (an older FILE stays as it was). Whole: the transfer ended cleanly (the
API breaks it off when the export fails half way: an incomplete chunked body) and the bytes are a
HAR document (it starts as one and ends with its closing bytes; up to FULL_CHECK_BYTES it is parsed
as JSON too). Otherwise the temporary file is removed and the command exits 1 saying why.

`-` writes to stdout as the bytes arrive: an export that fails half way cannot be taken back
there, but the command still says so and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import IO

from .cli import EXTRA_COMMANDS, _add_config_args, _load

FILTERS = ("container", "destination", "method", "session_id", "conversation_id", "from_date", "to_date")
HEAD = b'{"log":'
TAIL = b"]}}\n"  # greyproxy.har.DOCUMENT_TAIL
FULL_CHECK_BYTES = 32 * 1024 * 1024  # documents up to this size are parsed as JSON too (memory: ~10x)


class Incomplete(Exception):
    """The export is not a whole HAR document."""


def _check(first: bytes, last: bytes, path: Path | None) -> None:
    """Raise Incomplete unless the document read looks whole (and, from a file not too big, parses)."""
    if not first.startswith(HEAD) or not last.endswith(TAIL):
        raise Incomplete("the document does not end as a HAR document ends (the export stopped half way)")
    if path is not None and path.stat().st_size <= FULL_CHECK_BYTES:
        import orjson

        try:
            doc = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise Incomplete(f"the document is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("log", {}).get("entries"), list):
            raise Incomplete("the document has no log.entries")


def cmd_export(args: argparse.Namespace) -> int:
    import httpx

    cfg = _load(args)
    url = f"{cfg.api_base()}/api/transactions/export.har"
    params = {name: getattr(args, name) for name in FILTERS if getattr(args, name)}
    target = args.har
    out_path = None if target == "-" else Path(target)
    part: Path | None = None
    written = 0
    first, last = b"", b""
    try:
        sink: IO[bytes]
        if out_path is not None:
            fd, name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent or ".")
            part = Path(name)
            mask = os.umask(0o022)
            os.umask(mask)
            os.fchmod(fd, 0o666 & ~mask)  # FILE's mode as a plain open() would make it (mkstemp: 0600)
            sink = os.fdopen(fd, "wb")
        else:
            sink = sys.stdout.buffer
        try:
            with httpx.stream("GET", url, params=params, timeout=httpx.Timeout(30.0, read=300.0), trust_env=False) as r:
                if r.status_code != 200:
                    r.read()
                    try:
                        message = r.json().get("error", r.text)
                    except ValueError:
                        message = r.text
                    print(f"greyproxy: export failed ({r.status_code}): {message}", file=sys.stderr)
                    return _fail(part)
                for chunk in r.iter_bytes():
                    sink.write(chunk)
                    written += len(chunk)
                    if len(first) < len(HEAD):
                        first += chunk[: len(HEAD)]
                    last = (last + chunk)[-len(TAIL) :]
        finally:
            if part is not None:
                sink.close()
            else:
                sink.flush()
        _check(first, last, part)
    except httpx.RemoteProtocolError as exc:
        print(
            f"greyproxy: export incomplete: the API broke off the export after {written} bytes ({exc});"
            " its log says why",
            file=sys.stderr,
        )
        return _fail(part)
    except httpx.HTTPError as exc:
        print(f"greyproxy: export incomplete: cannot read the export from {url}: {exc}", file=sys.stderr)
        return _fail(part)
    except Incomplete as exc:
        print(f"greyproxy: export incomplete after {written} bytes: {exc}", file=sys.stderr)
        return _fail(part)
    except OSError as exc:
        print(f"greyproxy: cannot write {part or out_path}: {exc.strerror or exc}", file=sys.stderr)
        return _fail(part)
    except BaseException:  # Ctrl-C: nothing half-written is left
        _fail(part)
        raise
    if part is not None and out_path is not None:
        try:
            os.replace(part, out_path)
        except OSError as exc:
            print(f"greyproxy: cannot write {out_path}: {exc.strerror or exc}", file=sys.stderr)
            return _fail(part)
        print(f"wrote {out_path} ({written} bytes, HAR 1.2)", file=sys.stderr)
    return 0


def _fail(part: Path | None) -> int:
    if part is not None:
        part.unlink(missing_ok=True)
    return 1


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
