"""The API app in-process, without its peers, for unit tests (Falcon's test client, no sockets).

Not re-exported by ``harness``/conftest (it imports the whole API): ``from harness.api import ...``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import falcon.asgi
import falcon.testing

from greyproxy.config import load_config
from services.api.app import create_app
from services.api.context import ApiContext


def offline_context(data_dir: Path, config: Path | None = None) -> ApiContext:
    """An ApiContext on `config` (the defaults when None) and `data_dir`, with no bus publisher
    and no control clients: building the app and its static routes touch neither the bus nor the
    database."""
    cfg = (
        load_config(config, env={"GREYPROXY_DATA_HOME": str(data_dir)})
        if config
        else load_config(env={"GREYPROXY_DATA_HOME": str(data_dir)})
    )
    return ApiContext(
        cfg=cfg,
        publisher=None,
        db_executor=ThreadPoolExecutor(1),
        proxy=None,  # type: ignore[arg-type]
        recorder=None,
        maintenance=None,
    )  # type: ignore[arg-type]


def offline_app(tmp_path: Path, prefix: str = "/") -> falcon.asgi.App:
    """``create_app`` over ``offline_context`` with ``greyproxy.pathPrefix: prefix`` (config and
    data dir under `tmp_path`)."""
    config = tmp_path / "config.yaml"
    config.write_text(f'greyproxy: {{pathPrefix: "{prefix}"}}\n')
    return create_app(offline_context(tmp_path / "data", config))


class LocalClient(falcon.testing.TestClient):
    """Requests as a local client sends them: Host localhost unless told otherwise (Falcon's
    default Host is a foreign name, which the API's LocalOnly middleware answers with 421)."""

    def simulate_request(self, *args: Any, **kwargs: Any) -> falcon.testing.Result:
        kwargs.setdefault("host", "localhost")
        return super().simulate_request(*args, **kwargs)
