"""The ``mmsb`` command: run the demo; inspect, query, blame, replay, verify and
monitor a durable bus directory or a checkpoint file; benchmark.

Read commands open PATH without writing anything: a bus directory with
:func:`mmsb.open_readonly` (safe beside a live writer), a checkpoint file with
:func:`mmsb.load_checkpoint` into a fresh state. ``--json`` prints what a table shows
as one JSON document. A user error prints one line, ``mmsb: error: …``, on stderr and
exits with status 2; ``verify`` exits 1 when the bus is inconsistent or damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import MMSBError
from .params import PathParam

__all__ = ["main"]

EXIT_USER_ERROR = 2


def _fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    click.echo(f"mmsb: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns user errors (MMSB errors, OS errors, bad arguments) into one clear line on
    stderr and exit status 2, never a traceback."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare ``mmsb`` (click ≥ 8.2)
                exc.show()
                sys.exit(exc.exit_code)
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(exc.format_message() + hint, exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            click.echo("mmsb: aborted", err=True)
            sys.exit(130)
        except MMSBError as exc:
            _fail(str(exc))
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}")
        sys.exit(rv if isinstance(rv, int) else 0)


# -- shared pieces ----------------------------------------------------------------------

class _TimeType(click.ParamType):
    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from .views import parse_time

        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _RangeType(click.ParamType):
    name = "A:B"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int | None, int | None]:
        if isinstance(value, tuple):
            return value
        from .views import parse_range

        try:
            return parse_range(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _PageType(click.ParamType):
    name = "PAGE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip()
        if not text.isdigit() or int(text) < 1:
            self.fail(f"{value!r} is not a page id (page ids are integers from 1)", param, ctx)
        return int(text)


TIME = _TimeType()
PAGE = _PageType()
_TIME_HELP = "ISO 8601 (2025-01-31T12:00:00Z; no zone means UTC) or integer nanoseconds"

_path_arg = click.argument("path", type=PathParam(path_type=Path))
_json_opt = click.option("--json", "as_json", is_flag=True,
                         help="Print one JSON document instead of tables (for scripts).")
_page_arg = click.argument("page", type=PAGE)


def _out() -> Console:
    # Piped output gets room for the widest tables instead of rich's 80 columns.
    wide = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
    return Console(width=wide, highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


@contextlib.contextmanager
def _working(text: str) -> Iterator[None]:
    """A spinner on stderr while opaque work runs (only on a terminal)."""
    err = _err()
    if err.is_terminal:
        with err.status(text):
            yield
    else:
        yield


@contextlib.contextmanager
def _progress(text: str, total: int) -> Iterator[Any]:
    """A progress bar on stderr (only on a terminal); yields ``step(name)``."""
    err = _err()
    if not err.is_terminal or total <= 1:
        yield lambda _name: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[name]}"), console=err, transient=True) as bar:
        task = bar.add_task(text, total=total, name="")
        yield lambda name: bar.update(task, advance=1, name=name)


def _open(path: Path) -> Any:
    from .views import open_source

    with _working(f"reading {path}"):
        return open_source(path)


def _cell(value: Any) -> Text:
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, dict | list):
        return Text(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))
    return Text(str(value))


def _table(title: str | None, columns: list[str], rows: list[list[Any]],
           right: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, header_style="bold", title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    return table


def _kv_table(title: str, items: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in items:
        table.add_row(k, _cell(v))
    return table


# -- the group ----------------------------------------------------------------------------

@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsb")
def main() -> None:
    """MMSB, the Memory-Mapped State Bus: inspect, replay, verify and benchmark a bus.

    PATH is a durable bus directory (opened read-only, safe beside a live writer) or a
    checkpoint file. Times are printed in UTC with nanoseconds.
    """


@main.command(short_help="Run the guided demo (in memory, or on a durable bus with --path).")
@click.option("--path", type=PathParam(file_okay=False, path_type=Path), default=None,
              help="Run on a durable bus in this directory (created if missing) instead of in memory.")
def demo(path: Path | None) -> None:
    """Run the guided demo: pages, a dependency, writes, propagation, replay,
    checkpoint and restore, stats."""
    from .demo import run_demo

    run_demo(path, Console())


# -- inspect ------------------------------------------------------------------------------

@main.command(short_help="Pages, edges, log summary, checkpoint files and log segments.")
@_path_arg
@click.option("--max-pages", type=click.IntRange(min=0), default=100, show_default=True,
              help="Pages listed in the table (0: all). --json lists all.")
@_json_opt
def inspect(path: Path, max_pages: int, as_json: bool) -> None:
    """Pages (id, size, epoch, location, metadata), edges, the log and the files.

    For a bus: its checkpoint files (generation, LSN, size) and log segments (records,
    LSN range, state), and what recovery had to skip."""
    from .views import (
        bus_files_info,
        checkpoint_file_info,
        count_bus_files,
        edge_rows,
        log_summary,
        page_rows,
    )

    src = _open(path)
    state = src.state
    doc: dict[str, Any] = {"path": str(path), "kind": src.kind, "pages": page_rows(state),
                           "edges": edge_rows(state), "log": log_summary(state)}
    if src.kind == "bus":
        with _progress("checking files", count_bus_files(path)) as step:
            doc["bus"] = bus_files_info(path, step)
    else:
        doc["checkpoint"] = checkpoint_file_info(path)
    doc["notes"] = src.notes
    if as_json:
        _print_json(doc)
        return
    out = _out()
    pages = doc["pages"]
    shown = pages if max_pages == 0 else pages[:max_pages]
    title = f"{len(pages)} page(s) of {path} ({src.kind})"
    out.print(_table(title, ["id", "size", "epoch", "location", "deltas", "metadata"],
                     [[p["id"], p["size"], p["epoch"], p["location"], p["deltas"], p["metadata"]]
                      for p in shown], right=("id", "size", "epoch", "deltas")))
    if len(shown) < len(pages):
        out.print(f"… {len(pages) - len(shown)} more (--max-pages 0 lists all)")
    if doc["edges"]:
        out.print(_table("dependency edges", ["parent", "child", "type"],
                         [[e["parent"], e["child"], e["type"]] for e in doc["edges"]]))
    lg = doc["log"]
    out.print(_kv_table("log", [
        ("records", lg["records"]), ("deltas", f"{lg['deltas']} ({lg['sparse_deltas']} sparse)"),
        ("bytes changed", lg["bytes_changed"]), ("payload bytes", lg["payload_bytes"]),
        ("LSN range", f"{lg['first_lsn']} … {lg['last_lsn']}" if lg["records"] else "empty"),
        ("horizon LSN", f"{lg['horizon_lsn']}" + (" (history starts here)" if lg["horizon_lsn"]
                                                  else " (full history)")),
        ("first time", lg["first_time"]), ("last time", lg["last_time"]),
        ("sources", ", ".join(f"{k} {v}" for k, v in lg["sources"].items()) or None),
    ]))
    if src.kind == "bus":
        bus = doc["bus"]
        out.print(f"bus {bus['bus_id']}, created {bus['created']}, checkpoint generation "
                  f"{bus['generation']}")
        out.print(_table("checkpoint files", ["file", "generation", "LSN", "log from", "bytes",
                                              "written", "state"],
                         [[c["name"], c.get("generation"), c.get("lsn"), c.get("log_from_lsn"),
                           c.get("bytes"), c.get("written"), c.get("status")]
                          for c in bus["checkpoints"]],
                         right=("generation", "LSN", "log from", "bytes")))
        out.print(_table("log segments", ["file", "generation", "seq", "bytes", "records",
                                          "LSN range", "state"],
                         [[w["name"], w["generation"], w["seq"], w.get("bytes"), w.get("records"),
                           f"{w['first_lsn']} … {w['last_lsn']}" if "first_lsn" in w else None,
                           w.get("status")] for w in bus["wal"]],
                         right=("generation", "seq", "bytes", "records")))
    else:
        c = doc["checkpoint"]
        out.print(_kv_table("checkpoint file", [
            ("file", c["file"]), ("bytes", c.get("bytes")), ("LSN", c.get("lsn")),
            ("log from LSN", c.get("log_from_lsn")), ("written", c.get("written")),
            ("replay base", "nested" if c.get("has_base") else "none"),
            ("bus", c.get("bus_id")),
        ]))
    label = "recovery notes" if src.kind == "bus" else "notes"
    out.print(f"{label}: " + ("; ".join(doc["notes"]) if doc["notes"] else "none"), markup=False)


# -- log, history, blame --------------------------------------------------------------------

@main.command("log", short_help="The log's deltas, filtered by page, source or time.")
@_path_arg
@click.option("--page", type=PAGE, help="Only this page's deltas.")
@click.option("--source", help="Only deltas of this source (api, propagation, compressed …).")
@click.option("--since", type=TIME, help=f"Only deltas at or after this time: {_TIME_HELP}.")
@click.option("--until", type=TIME, help=f"Only deltas at or before this time: {_TIME_HELP}.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the newest N matching deltas.")
@_json_opt
def log_command(path: Path, page: int | None, source: str | None, since: int | None,
                until: int | None, limit: int | None, as_json: bool) -> None:
    """The deltas of the log, oldest first: LSN, time, page, epochs, source, bytes."""
    import mmsb

    from .views import delta_row, require_page_history

    if since is not None and until is not None and since > until:
        raise click.BadParameter("--since is after --until", param_hint="'--since'")
    src = _open(path)
    if page is not None:
        require_page_history(src.state, page, path)
    found = mmsb.query_log(src.state, page_id=page, start_time=since, end_time=until,
                           source=source)
    shown = found[-limit:] if limit is not None else found
    rows = [delta_row(d) for d in shown]
    if as_json:
        _print_json({"path": str(path), "matched": len(found), "shown": len(rows), "deltas": rows})
        return
    out = _out()
    out.print(_table(None, ["lsn", "time", "page", "epochs", "source", "bytes", "kind"],
                     [[r["lsn"], r["time"], r["page"], f"{r['base_epoch']}→{r['epoch']}",
                       r["source"], r["bytes"], r["kind"]] for r in rows],
                     right=("lsn", "page", "bytes")))
    more = f" (the newest {len(rows)} shown)" if len(rows) < len(found) else ""
    out.print(f"{len(found)} delta(s) matched{more}")


@main.command(short_help="Every retained delta of one page, with a hex preview.")
@_path_arg
@_page_arg
@_json_opt
def history(path: Path, page: int, as_json: bool) -> None:
    """Every retained delta of one page: epoch, LSN, time, source, bytes changed and a
    hex preview of the new bytes (``@offset: bytes``); for propagated deltas recorded with
    instrumentation, the code that produced them (name, hash, IR page and epoch)."""
    from .views import code_label, history_rows, require_page_history

    src = _open(path)
    require_page_history(src.state, page, path)
    rows = history_rows(src.state, page)
    live = page in src.state.pages
    if as_json:
        _print_json({"path": str(path), "page": page, "live": live, "deltas": rows})
        return
    out = _out()
    title = f"history of page {page}" + ("" if live else " (deleted)")
    with_code = any(r["code"] for r in rows)
    out.print(_table(title, ["epoch", "lsn", "time", "source", "bytes", "changed bytes"]
                     + (["code"] if with_code else []),
                     [[f"{r['base_epoch']}→{r['epoch']}", r["lsn"], r["time"], r["source"],
                       r["bytes"], r["preview"]] + ([code_label(r["code"])] if with_code else [])
                      for r in rows],
                     right=("lsn", "bytes")))
    if not rows:
        out.print(f"page {page} has no retained deltas (never written, or its history was "
                  "compressed away)")


@main.command(short_help="Which delta last wrote each byte range of a page.")
@_path_arg
@_page_arg
@click.option("--range", "byte_range", type=_RangeType(),
              help="Only bytes A:B of the page (half-open, like a slice: 0:16, 8:, :32).")
@_json_opt
def blame(path: Path, page: int, byte_range: tuple[int | None, int | None] | None,
          as_json: bool) -> None:
    """Who wrote each byte of a page: for every maximal byte range, the LSN, epoch,
    time and source of the delta that last wrote it (and, for a propagated delta recorded
    with instrumentation, the code that produced it)."""
    from .views import blame as blame_view
    from .views import code_label

    src = _open(path)
    lo, hi = byte_range if byte_range is not None else (None, None)
    doc = blame_view(src.state, page, lo, hi)
    if as_json:
        _print_json({"path": str(path), **doc})
        return
    rows = []
    for r in doc["ranges"]:
        status = r["status"]
        if status == "delta":
            source = r["source"] + (f" [{code_label(r['code'])}]" if r.get("code") else "")
            who = [r["lsn"], f"{r['base_epoch']}→{r['epoch']}", r["time"], source]
        elif status == "cloned":
            who = [r["lsn"], None, r["time"], f"(cloned from page {r['source_page']})"]
        elif status == "before_history":
            who = [None, None, None,
                   f"(written at or before LSN {r['horizon_lsn']}, where the retained "
                   "history starts)"]
        else:
            who = [None, None, None, "(never written)"]
        rows.append([f"{r['start']}:{r['stop']}", r["length"], *who, r["preview_hex"]])
    _out().print(_table(
        f"blame of page {page} (size {doc['size']}, epoch {doc['epoch']}), bytes "
        f"{doc['start']}:{doc['stop']}",
        ["bytes", "length", "lsn", "epoch", "time", "source", "now (hex)"], rows,
        right=("length", "lsn")))


# -- replay, verify, stats ------------------------------------------------------------------

@main.command(short_help="Write the state at a past LSN, epoch or time as a checkpoint.")
@_path_arg
@click.option("--lsn", type=click.IntRange(min=0), help="The state right after this log record.")
@click.option("--epoch", type=click.IntRange(min=0),
              help="Each page with only its deltas of epoch ≤ N (a per-page cut).")
@click.option("--time", "at_time", type=TIME, help=f"The state at this moment: {_TIME_HELP}.")
@click.option("--out", "out_path", required=True, type=PathParam(path_type=Path),
              help="Checkpoint file to write (load it with mmsb.load_checkpoint).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_json_opt
def replay(path: Path, lsn: int | None, epoch: int | None, at_time: int | None, out_path: Path,
           force: bool, as_json: bool) -> None:
    """Rebuild a past state (--lsn, --epoch or --time) and write it as a checkpoint."""
    import mmsb

    chosen = [name for name, v in (("--lsn", lsn), ("--epoch", epoch), ("--time", at_time))
              if v is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --lsn, --epoch, --time"
                               + (f" (got {', '.join(chosen)})" if chosen else ""))
    if out_path.is_dir():
        raise click.BadParameter(f"{out_path} is a directory", param_hint="'--out'")
    if out_path.exists() and not force:
        raise click.BadParameter(f"{out_path} exists (--force replaces it)", param_hint="'--out'")
    if path.is_dir() and out_path.resolve().is_relative_to(path.resolve()):
        raise click.BadParameter("refusing to write inside the bus directory; the bus owns it",
                                 param_hint="'--out'")
    src = _open(path)
    src.require_replayable("replay")
    with _working("replaying"):
        if lsn is not None:
            past = mmsb.replay_to_lsn(src.state, lsn)
            target = {"lsn": lsn}
        elif epoch is not None:
            past = mmsb.replay_to_epoch(src.state, epoch)
            target = {"epoch": epoch}
        else:
            assert at_time is not None
            past = mmsb.replay_to_timestamp(src.state, at_time)
            target = {"time_ns": at_time}
        size = mmsb.checkpoint_log(past, out_path)
    doc = {"path": str(path), "out": str(out_path), "bytes": size, **target,
           "state_lsn": past.last_lsn, "pages": len(past.pages),
           "deltas": len(past.tlog)}
    if as_json:
        _print_json(doc)
        return
    what = ", ".join(f"{k.removesuffix('_ns')} {v}" for k, v in target.items())
    _out().print(f"wrote {out_path} ({size:,} bytes): the state at {what} — "
                 f"{doc['pages']} page(s), {doc['deltas']} delta(s), last LSN {doc['state_lsn']}")


@main.command(short_help="Check the state against the replay of its log, and the files.")
@_path_arg
@click.option("--check-code", is_flag=True,
              help="Also fail when a propagated delta came from code that differs from the "
                   "code now on its IR page.")
@_json_opt
def verify(path: Path, check_code: bool, as_json: bool) -> None:
    """Check that the state equals the replay of its log (and, for a bus, that every
    checkpoint and log segment reads cleanly). Exit 1 with a report otherwise."""
    from .views import count_bus_files
    from .views import verify as verify_view

    src = _open(path)
    total = count_bus_files(path) if src.kind == "bus" else 0
    with _working("replaying the log"), _progress("checking files", total) as step:
        doc = verify_view(src, step)
    doc = {"path": str(path), "kind": src.kind, **doc}
    if check_code:
        import mmsb

        changed = [d for d in mmsb.code_differences(src.state) if d.status == "changed"]
        doc["code_changed"] = [{"page": d.page_id, "lsn": d.lsn, "deltas": d.deltas,
                                "produced_by": d.produced_by, "now": d.current,
                                "reason": d.reason} for d in changed]
        doc["ok"] = doc["ok"] and not changed
    if as_json:
        _print_json(doc)
    else:
        out = _out()
        if doc["consistent"]:
            out.print(f"OK: the state equals the replay of its log ({doc['records']} records, "
                      f"{doc['pages']} pages, last LSN {doc['last_lsn']})")
        else:
            out.print("MISMATCH: the state differs from the replay of its log:")
            for line in doc["differences"]:
                out.print(f"  - {line}", markup=False)
        for c in doc.get("code_changed", []):
            out.print(f"CODE CHANGED: page {c['page']}: {c['deltas']} propagated delta(s) "
                      f"from LSN {c['lsn']}: {c['reason']}", markup=False)
        if doc["problems"]:
            out.print("DAMAGED files:")
            for line in doc["problems"]:
                out.print(f"  - {line}", markup=False)
        for line in doc["warnings"]:
            out.print(f"note: {line}", markup=False)
    if not doc["ok"]:
        sys.exit(1)


@main.command(short_help="Statistics of the state (get_stats).")
@_path_arg
@_json_opt
def stats(path: Path, as_json: bool) -> None:
    """Statistics of the state (mmsb.get_stats): pages, deltas, log, graph, arena,
    latencies.

    Latencies and activity counters are kept by the process that writes and are not
    stored on disk: here they describe only this read."""
    import mmsb

    src = _open(path)
    s = mmsb.get_stats(src.state)
    if as_json:
        _print_json({"path": str(path), "kind": src.kind, **s.as_dict()})
        return
    mmsb.print_stats(src.state)


# -- metrics --------------------------------------------------------------------------------

class _Reloading:
    """The state of PATH, reopened read-only when its files change (checked with
    ``stat`` and the log end the writer published, on each scrape, so an idle bus
    costs no recovery)."""

    def __init__(self, path: Path, src: Any) -> None:
        self.path = path
        self.src = src
        self.key = self._key()
        self.lock = threading.Lock()

    def _key(self) -> tuple[Any, ...]:
        from .._storage.bus import bus_files
        from .._storage.mapped import published_log_end

        if not self.path.is_dir():
            st = self.path.stat()
            return (st.st_size, st.st_mtime_ns)
        files = bus_files(self.path)
        out: list[Any] = []
        for p in [*files["checkpoints"], *files["wal"]]:
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime_ns))
        # A write into a segment's space written ahead changes neither its size nor,
        # within the clock's tick, its time: the log's end the writer published does.
        out.append(published_log_end(self.path))
        return tuple(out)

    def __call__(self) -> Any:
        from .views import open_source

        with self.lock:
            key = self._key()
            if key != self.key:
                try:
                    self.src = open_source(self.path)
                except (MMSBError, OSError):
                    # The writer may have rolled a file between our listing and reading.
                    self.src = open_source(self.path)
                    key = self._key()
                self.key = key
            return self.src.state


@main.command(short_help="Prometheus metrics of a bus: print once, or serve on a port.")
@_path_arg
@click.option("--port", type=click.IntRange(0, 65535),
              help="Serve http://HOST:PORT/metrics (required unless --once).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--once", is_flag=True, help="Print the exposition text once and exit.")
def metrics(path: Path, port: int | None, host: str, once: bool) -> None:
    """Prometheus metrics of a bus (or checkpoint): pages by location, bytes, deltas,
    log records, last LSN, graph, arena, and the bus's files on disk.

    Served from a read-only view that follows the writer (reopened when the bus's
    files change). Needs the extra: pip install 'mmsb[metrics]'."""
    from ..metrics import render_metrics, require_prometheus_client, serve_metrics

    if not once and port is None:
        raise click.UsageError("give --port N to serve, or --once to print the metrics once")
    require_prometheus_client()
    src = _open(path)
    bus_path = path if src.kind == "bus" else None
    if once:
        click.echo(render_metrics(src.state, bus_path=bus_path, activity=False), nl=False)
        return
    assert port is not None
    server = serve_metrics(_Reloading(path, src), port, host, bus_path=bus_path, activity=False)
    _err().print(f"serving metrics of {path} at http://{server.host}:{server.port}/metrics "
                 "(Ctrl-C stops)")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()


@main.command(short_help="The change feed of a bus: one line per event, optionally followed.")
@_path_arg
@click.option("--since", type=click.IntRange(min=0), default=0, show_default=True,
              help="Print the events of records after this LSN.")
@click.option("--follow", "-f", is_flag=True,
              help="Keep waiting for new records (Ctrl-C or SIGTERM stops).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="With --follow: stop after this many seconds without a record.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tail(path: Path, since: int, follow: bool, timeout: float | None, as_json: bool) -> None:
    """The events of a durable bus's log after LSN --since, in LSN order (the change
    feed of ``mmsb.attach(PATH).changes``): LSN, time, event type, page and payload.
    Resume an interrupted tail with --since set to the last LSN printed."""
    from .._reader import attach
    from .views import format_time

    if not path.is_dir():
        raise click.UsageError(f"{path} is not a bus directory")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with attach(path) as reader:
            for ev in reader.changes(since, follow=follow, timeout=timeout):
                if as_json:
                    line = json.dumps({"lsn": ev.lsn, "timestamp_ns": ev.timestamp,
                                       "time": format_time(ev.timestamp), "type": ev.type.name,
                                       "page": ev.page_id, "payload": ev.payload},
                                      default=_json_default)
                else:
                    fields = " ".join(f"{k}={v}" for k, v in ev.payload.items())
                    line = (f"{ev.lsn:>8} {format_time(ev.timestamp)} {ev.type.name:<16} "
                            f"page={ev.page_id} {fields}".rstrip())
                click.echo(line)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _attach_optional_commands() -> None:
    from ..bench.command import bench_command

    main.add_command(bench_command)
    from ..ui.command import ui_command

    main.add_command(ui_command)
    from .replicate import follow_command, promote_command

    main.add_command(follow_command)
    main.add_command(promote_command)


_attach_optional_commands()
