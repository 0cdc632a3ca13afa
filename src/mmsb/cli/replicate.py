"""``mmsb follow`` and ``mmsb promote``: a follower in the foreground, and failover."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from .params import PathParam

__all__ = ["follow_command", "promote_command"]


def _bus_id(value: str) -> int:
    try:
        bus = int(value, 16)
    except ValueError:
        raise click.BadParameter(f"a bus id is 16 hex digits (as `mmsb inspect` prints it), "
                                 f"not {value!r}") from None
    if not 0 < bus < 1 << 64:
        raise click.BadParameter(f"{value!r} is not a bus id")
    return bus


@click.command("follow", short_help="Keep a local copy of a replicated bus (a follower).")
@click.argument("url")
@click.argument("bus_id")
@click.argument("path", type=PathParam(file_okay=False, path_type=Path))
@click.option("--node", help="This follower's name (1-16 of A-Z a-z 0-9 _ . -); kept in PATH.")
@click.option("--ack", default="local", show_default=True,
              help='What the bus acknowledges with once this follower leads it: "local" or '
                   '"replicas:N".')
@click.option("--every", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds between status lines.")
@click.option("--json", "as_json", is_flag=True, help="Status lines as JSON objects.")
def follow_command(url: str, bus_id: str, path: Path, node: str | None, ack: str,
                   every: float, as_json: bool) -> None:
    """Follow bus BUS_ID published to Redis at URL, keeping a durable copy in PATH,
    until interrupted (Ctrl-C, SIGTERM). Prints the applied LSN and the lag now and
    then. Other processes read the copy with `mmsb.attach(PATH)` or `mmsb tail PATH`.
    When `mmsb promote` picks this follower, it takes over the bus, stops, and says how
    to open PATH as the leader."""
    from .. import _api
    from .._replication.follower import follow
    from ..config import MMSBConfig

    promoted = threading.Event()
    f = follow(url, _bus_id(bus_id), path, config=MMSBConfig(ack=ack), node=node,
               on_promote=lambda _state: promoted.set())
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        click.echo(f"following bus {_bus_id(bus_id):016x} from {url} into {path} as node {f.node}")
        next_line = 0.0
        while not promoted.is_set():
            if f.error is not None:
                raise click.ClickException(f"the follower stopped: {f.error}")
            if time.monotonic() >= next_line:
                next_line = time.monotonic() + every
                _status(f, as_json)
            promoted.wait(0.1)
        state = f.state
        lsn = state.log.last_lsn
        term = f.term
        _api.mmsb_stop(state)
        click.echo(f"{path} now leads bus {f.bus_id:016x} (term {term}, from LSN {lsn}); open "
                   f"it with mmsb_start(path={str(path)!r}, "
                   f"config=MMSBConfig(replicate_to={url!r}))")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not promoted.is_set():
            f.close()


def _status(f: Any, as_json: bool) -> None:
    from ..errors import ReplicationError

    try:
        lag = f.lag
    except ReplicationError as exc:
        click.echo(f"Redis does not answer: {exc}", err=True)
        return
    if as_json:
        click.echo(json.dumps({"applied_lsn": lag.applied_lsn, "leader_lsn": lag.leader_lsn,
                               "lag_lsns": lag.lsns, "lag_seconds": lag.seconds,
                               "term": lag.term}))
    else:
        click.echo(f"applied LSN {lag.applied_lsn} of {lag.leader_lsn} (term {lag.term}), "
                   f"{lag.lsns} behind, {lag.seconds:.3f} s")
    sys.stdout.flush()


@click.command("promote", short_help="Make a follower the leader of a replicated bus.")
@click.argument("path", required=False, type=PathParam(file_okay=False, path_type=Path))
@click.option("--url", help="The Redis URL (default: the one recorded in PATH).")
@click.option("--best", is_flag=True,
              help="Instead of PATH: the most advanced live follower (with --url and --bus).")
@click.option("--bus", "bus_id", help="With --best: the bus id (16 hex digits).")
@click.option("--force", is_flag=True,
              help="Depose a leader whose lease still holds (planned switch-over).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for the follower to take over.")
def promote_command(path: Path | None, url: str | None, best: bool, bus_id: str | None,
                    force: bool, timeout: float) -> None:
    """Fail over a replicated bus to the follower whose copy is in PATH: it fences the
    current term, applies all the old leader published, and leads the next term. A
    follower running there (`mmsb follow`, `mmsb.follow`) is asked to do it through
    Redis; a stopped one is caught up and promoted by this command, then closed, ready
    to be opened as the leader. With --best (and --url, --bus) the most advanced live
    follower is asked instead."""
    from .._replication.wire import FOLLOWER, read_role
    from .._storage.bus import bus_identity
    from ..errors import BusLockedError, MMSBError

    if best == (path is not None):
        raise click.UsageError("give a follower's PATH, or --best with --url and --bus")
    if best:
        if url is None or bus_id is None:
            raise click.UsageError("--best needs --url and --bus")
        _request(url, _bus_id(bus_id), "best", force, timeout)
        return
    assert path is not None
    try:
        bus = bus_identity(path)
        role = read_role(path)
    except MMSBError as exc:
        raise click.ClickException(str(exc)) from None
    if role is None or role.role != FOLLOWER:
        what = "never replicated" if role is None else f"leads term {role.term}"
        raise click.ClickException(f"{path} is not a follower's copy ({what})")
    url = url or role.url
    try:
        _promote_here(url, bus, path, force, timeout)
    except BusLockedError:
        # A follower process holds it: ask that one, through Redis.
        _request(url, bus, role.node, force, timeout)


def _promote_here(url: str, bus: int, path: Path, force: bool, timeout: float) -> None:
    """Open the stopped follower in ``path``, catch it up, promote it, close it."""
    from .. import _api
    from .._replication.follower import follow
    from .._replication.wire import Keys
    from ..errors import BusLockedError, MMSBError

    try:
        f = follow(url, bus, path)
    except BusLockedError:
        raise
    except MMSBError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        head = int(f.client.hget(Keys(bus).head, "lsn") or 0)
        if not f.wait_for(head, timeout):
            raise click.ClickException(f"{path} did not catch up to LSN {head} within "
                                       f"{timeout:g} s; nothing was promoted")
        state = f.promote(force=force)
        term, lsn = f.term, state.log.last_lsn
        _api.mmsb_stop(state)
    except MMSBError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        f.close()
    click.echo(f"{path} now leads bus {bus:016x} (term {term}, from LSN {lsn})")


def _request(url: str, bus: int, node: str, force: bool, timeout: float) -> None:
    """Ask the running follower ``node`` (or ``best``) to take over; wait for the term."""
    from .._replication.link import connect, redis_errors
    from .._replication.wire import Keys

    k = Keys(bus)
    client = connect(url)
    try:
        before = int(client.get(k.term) or 0)
        client.set(k.promote, f"{node}:{'1' if force else '0'}", px=int(timeout * 1000))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            term = int(client.get(k.term) or 0)
            if term > before and client.hexists(k.terms, term):
                lease = (client.get(k.lease) or b"").decode("ascii", "replace")
                click.echo(f"term {term} of bus {bus:016x} is led by {lease.partition(':')[2]} "
                           f"from LSN {int(client.hget(k.terms, term))}")
                return
            time.sleep(0.05)
        client.delete(k.promote)
    except redis_errors() as exc:
        raise click.ClickException(f"cannot reach Redis at {url} ({exc})") from None
    finally:
        client.close()
    raise click.ClickException(
        f"no follower took over within {timeout:g} s (is `{node}` running and caught up? a "
        "live leader's lease needs --force); the request was withdrawn")
