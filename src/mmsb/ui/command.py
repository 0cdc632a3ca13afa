"""The ``mmsb ui`` command: serve the inspector of PATH on the loopback address."""

from __future__ import annotations

import signal
import socket
import webbrowser
from pathlib import Path
from typing import Any

import click

__all__ = ["ui_command", "serve"]


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 0,
          open_browser: bool = False) -> None:
    """Serve the inspector of ``path`` on ``host:port`` until interrupted (Ctrl-C or
    SIGTERM stop it cleanly). ``port`` 0 picks a free port. The URL is printed once the
    socket is bound."""
    from . import require_web_stack
    from ._app import create_app
    from ._data import Inspected

    require_web_stack()
    import uvicorn

    inspected = Inspected(path)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening before the URL is printed: a client that reads it can connect at
        # once (it waits in the backlog until the server loop runs).
        sock.listen(128)
    except OSError:
        sock.close()
        inspected.close()
        raise
    bound = sock.getsockname()[1]
    name = f"[{host}]" if ":" in host else host
    allowed = {f"{name}:{bound}".lower()}
    if host in ("127.0.0.1", "::1"):
        allowed.add(f"localhost:{bound}")
    url = f"http://{name}:{bound}/"
    app = create_app(inspected, lambda: allowed)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                            lifespan="off")
    class _Server(uvicorn.Server):
        # Ctrl-C or SIGTERM stop the server gracefully and the command returns (exit
        # status 0), instead of the signal being raised again after the shutdown.
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    server = _Server(config)
    click.echo(f"mmsb ui: inspecting {path} ({inspected.src.kind}) at {url} (Ctrl-C stops)")
    if open_browser:
        webbrowser.open(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        inspected.close()
    click.echo("mmsb ui: stopped")


@click.command("ui", short_help="A read-only web inspector of a bus or checkpoint.")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (requests must name it in their Host header).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port to listen on (0: a free one).")
@click.option("--open", "open_browser", is_flag=True, help="Open the URL in a browser.")
def ui_command(path: Path, host: str, port: int, open_browser: bool) -> None:
    """Serve a read-only web inspector of PATH (a bus directory, beside a live writer,
    or a checkpoint file): timeline, pages and heat maps, page history with blame, the
    dependency graph at any LSN, statistics, and live updates. Prints its URL; Ctrl-C
    stops it. Needs the extra: pip install 'mmsb[ui]'."""
    from . import require_web_stack

    require_web_stack()
    serve(path, host, port, open_browser=open_browser)
