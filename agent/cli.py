"""`edge-agent`: the command line.

Exit codes: 0 ok, 2 usage or config error, 1 runtime failure. Expected errors are one
line on stderr, never a traceback (``--debug`` shows it). ``status`` adds 3 (the agent is
not running); ``status --check`` has the monitoring-plugin codes (0-3, never another).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson

from agent import __version__
from agent.buffer import operator as buffer_operator
from agent.config import Config, load_config
from agent.errors import ConfigError, EdgeAgentError

if TYPE_CHECKING:
    from agent.status_model import StatusSnapshot

CONFIG_OPTION = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("/etc/edge-agent/edge-agent.toml"),
    show_default=True,
    help="config file",
)


#: status' own -c: an unreadable config is its one line saying which group to join
#: (_load_readable), not click's "is not readable" usage error
STATUS_CONFIG_OPTION = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, readable=False),
    default=Path("/etc/edge-agent/edge-agent.toml"),
    show_default=True,
    help="config file",
)


class Failure(click.ClickException):
    """A runtime failure: exit 1 with one line."""

    exit_code = 1


def _load(path: Path) -> Config:
    return load_config(path)


class LazyGroup(click.Group):
    """Commands that live beside their adapters (and the reference gateway) are found by
    entry point (agent/registry.py) and imported only when used, so that `edge-agent
    status` does not pay for importing asyncua (seconds on a small box)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from agent import registry

        return sorted({*super().list_commands(ctx), *registry.command_names()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None:
            return found
        from agent import registry

        command = registry.command(cmd_name)
        return command if isinstance(command, click.Command) else None


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "-V", "--version", prog_name="edge-agent")
@click.option("--debug", is_flag=True, hidden=True, help="show tracebacks")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Plant-edge store-and-forward agent: OPC UA and MES in, ordered batches out."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# ---------------------------------------------------------------------------------- run


@cli.command()
@CONFIG_OPTION
@click.option(
    "--log-format",
    type=click.Choice(["auto", "text", "json"]),
    default=None,
    help="log format (default: [log] format; auto = text on a terminal, JSON lines otherwise)",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
def run(config_path: Path, log_format: str | None, log_level: str | None) -> None:
    """Run the agent until SIGTERM/SIGINT (SIGHUP reloads the config)."""
    from agent.logs import setup_logging
    from agent.runtime import run_agent

    cfg = _load(config_path)
    setup_logging(log_level or cfg.log.level, log_format or cfg.log.format)
    _preflight_for_run(cfg, config_path)
    _register_secrets(cfg)
    asyncio.run(run_agent(config_path))


def _preflight_for_run(cfg: Config, config_path: Path) -> None:
    """Refuse to start, with the lines `config check` prints, what would fail on opening."""
    from agent.preflight import preflight, running_agent_pid

    pid = running_agent_pid(Path(cfg.buffer.path))
    if pid is not None and pid != os.getpid():
        raise Failure(
            f"an agent is already running with buffer {cfg.buffer.path} (pid {pid}): "
            "stop it first (systemctl stop edge-agent), or reload it with SIGHUP"
        )
    problems = preflight(cfg, config_path, for_run=True).problems
    if problems:
        for p in problems:
            click.echo(f"config error: {p}", err=True)
        raise SystemExit(2)


def _register_secrets(cfg: Config) -> None:
    """Tell the log redactor every secret the config holds, so none is ever printed."""
    from pydantic import SecretStr

    from agent.config import read_secret
    from agent.logs import register_secret

    for section in (*cfg.sinks.values(), *cfg.sources.values()):
        data = dict(section)
        for key, value in data.items():
            if isinstance(value, SecretStr):
                register_secret(value.get_secret_value())
            elif key.endswith("_file") and value is not None and key[:-5] in data:
                with contextlib.suppress(ConfigError):
                    register_secret(read_secret(None, Path(value), key[:-5]))


# ---------------------------------------------------------------------------------- config


@cli.group()
def config() -> None:
    """Check, show and write configuration files."""


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (for scripts)")
def config_check(file: Path, as_json: bool) -> None:
    """Validate FILE and open everything `run` would open (certificates, keys, secret
    files, the buffer, listen addresses, directories) without starting anything.

    Each problem is one line, in the file's order, naming the key path and the fix; a
    deprecated key is a "warning:" line naming its new name. Exit 0 when run can start
    (warnings or not), 2 otherwise."""
    from agent.preflight import Problem, Report, preflight

    cfg: Config | None = None
    try:
        cfg = _load(file)
    except ConfigError as exc:
        if click.get_current_context().find_root().obj.get("debug"):
            raise
        report = Report(problems=[Problem(exc.path, exc.message)])
    else:
        report = preflight(cfg, file)
    if as_json:
        doc = {
            "file": str(file),
            "ok": not report.problems,
            "problems": [{"key": p.key, "message": p.message} for p in report.problems],
            "notes": [{"key": p.key, "message": p.message} for p in report.notes],
            "warnings": list(cfg.warnings) if cfg is not None else [],
        }
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in cfg.warnings if cfg is not None else ():
            click.echo(f"warning: {line}", err=True)  # deprecated keys: still ok, exit 0
        for p in report.problems:
            click.echo(f"config error: {p}", err=True)
        for p in report.notes:
            click.echo(f"note: {p}")
        if cfg is not None and not report.problems:
            click.echo(
                f"{file}: ok ({len(cfg.sources)} source(s): {', '.join(cfg.sources) or '-'}; "
                f"{len(cfg.sinks)} sink(s): {', '.join(cfg.sinks)}; buffer {cfg.buffer.path})"
            )
    if report.problems:
        raise SystemExit(2)


@config.command("sample")
@click.argument("types", nargs=-1)
def config_sample(types: tuple[str, ...]) -> None:
    """Print a complete commented config for the adapters TYPES (e.g. `opcua https`;
    `sink:mqtt` or `source:mqtt` where a type is both). Default: https and mes_http."""
    from agent.config_render import sample

    click.echo(sample(types), nl=False)


@config.command("show")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="print it as JSON")
def config_show(config_path: Path, as_json: bool) -> None:
    """Print the effective config: every key with its default filled in, secrets redacted."""
    from agent.config_render import effective

    click.echo(effective(_load(config_path), as_json=as_json), nl=False)


# ---------------------------------------------------------------------------------- status


class NoBuffer(Failure):
    """The buffer does not exist: the agent never ran with this config."""


def _snapshot_offline(cfg: Config) -> StatusSnapshot:
    from agent.status import access_problem, build_snapshot, read_offline

    path = Path(cfg.buffer.path)
    problem = access_problem(path)
    if problem is not None:
        raise Failure(problem)
    try:
        rows, hb, meta = read_offline(path)
    except FileNotFoundError:
        raise NoBuffer(
            f"no buffer at {path}: the agent has not run with this config yet "
            "(start it: edge-agent run -c FILE)"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise Failure(f"cannot read buffer {path}: {exc}") from None
    sinks = {}
    for r in rows:
        sinks[r["name"]] = (cfg.sink_for(r["name"]), cfg.priority_of(r["name"]))
    return build_snapshot(
        rows=rows,
        heartbeat=hb,
        meta=meta,
        path=path,
        max_bytes=cfg.buffer.max_bytes,
        on_full=cfg.buffer.on_full,
        durability=cfg.buffer.durability,
        agent_id=cfg.agent.id,
        plant=cfg.agent.plant,
        version=__version__,
        stream_sinks=sinks,
    )


class Duration(click.ParamType[float | None]):
    """A duration as in the config (90s, 15m, 4h, 2d, plain seconds); ``off`` disables."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float | None:
        if value is None or isinstance(value, float):
            return value
        if str(value).strip().lower() in ("off", "none", "-"):
            return None
        from agent.config import parse_duration

        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Count(click.ParamType[int | None]):
    name = "count"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() in ("off", "none", "-"):
            return None
        if not str(value).strip().isdigit():
            self.fail(f"'{value}' is not a count (a whole number, or off)", param, ctx)
        return int(value)


_Decorated = TypeVar("_Decorated", bound=Callable[..., Any])


def _threshold(
    name: str, kind: click.ParamType[Any], default: str, what: str
) -> Callable[[_Decorated], _Decorated]:
    return click.option(f"--{name}", type=kind, default=default, show_default=True,
                        help=f"--check: {what} (off disables)")  # fmt: skip


def _load_readable(path: Path) -> Config:
    """_load, but a config this user may not read says how to get access (status is the
    one command a non-root operator runs)."""
    from agent.status import unreadable

    problem = unreadable(path)
    if problem is not None:
        raise Failure(problem)
    try:
        return _load(path)
    except PermissionError as exc:  # a file the config names (ca_file, token_file, ...)
        named = Path(exc.filename) if exc.filename else path
        raise Failure(unreadable(named) or f"permission denied: {named}") from None


def _status_check(config_path: Path, thresholds: Any) -> None:
    """The monitoring-plugin form: one line on stdout, exit 0/1/2/3, never another code."""
    from agent.status_check import CRITICAL, UNKNOWN, evaluate, line

    try:
        cfg = _load_readable(config_path)
        code, out = evaluate(_snapshot_offline(cfg), thresholds)
    except NoBuffer as exc:
        code, out = CRITICAL, line(CRITICAL, f"agent not running: {exc.message}")
    except (Failure, ConfigError, OSError) as exc:
        text = exc.message if isinstance(exc, Failure) else f"{exc}"
        if isinstance(exc, ConfigError):
            text = f"config error: {exc}"
        code, out = UNKNOWN, line(UNKNOWN, text)
    click.echo(out)
    sys.exit(code)


@cli.command()
@STATUS_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="print the snapshot as JSON (schema 1)")
@click.option("--watch", is_flag=True, help="refresh every --interval seconds until Ctrl-C")
@click.option("--interval", type=float, default=2.0, show_default=True)
@click.option(
    "--check",
    is_flag=True,
    help="monitoring plugin (Nagios, Icinga, Zabbix, Checkmk): one line with perfdata; "
    "exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
)
@_threshold("warn-age", Duration(), "15m", "WARNING when the oldest unsent event is older")
@_threshold("crit-age", Duration(), "4h", "CRITICAL when the oldest unsent event is older")
@_threshold("warn-runway", Duration(), "12h", "WARNING when the buffer is full sooner")
@_threshold("crit-runway", Duration(), "2h", "CRITICAL when the buffer is full sooner")
@_threshold("warn-dead-letters", Count(), "0", "WARNING above this many dead letters")
@_threshold("crit-dead-letters", Count(), "off", "CRITICAL above this many dead letters")
def status(
    config_path: Path,
    as_json: bool,
    watch: bool,
    interval: float,
    check: bool,
    **thresholds: Any,
) -> None:
    """Backlog, oldest unsent age, connections and errors at a glance (agent running or not).

    Exit codes: 0 the agent runs, 3 it does not (the table still shows the buffer), 1 the
    status cannot be read (the line says why), 2 a config error. With --json: 0 whenever
    the snapshot is printed ("running" says the rest), like `systemctl show`. With --check:
    0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (Nagios plugin guidelines).
    """
    if check:
        from agent.status_check import Thresholds

        _status_check(config_path, Thresholds(**thresholds))
    cfg = _load_readable(config_path)
    if as_json and not watch:
        snap_json = _snapshot_offline(cfg).to_dict()
        click.echo(orjson.dumps(snap_json, option=orjson.OPT_INDENT_2).decode())
        return
    from agent.status_view import render

    if not watch:
        snap = _snapshot_offline(cfg)
        render(snap)
        if not snap.agent.running:
            sys.exit(3)  # LSB and `systemctl status`: 3 = program is not running
        return
    from rich.console import Console
    from rich.live import Live

    from agent.status_view import WIDTH, renderable

    probe = Console()
    # piped (a file, `| tee`): exactly 100 columns, as the one-shot table; a terminal: its own
    if not probe.is_terminal:
        # Piped (a file, `| tee`): one frame per interval, exactly 100 columns like the
        # one-shot table, with the time between frames (a Live display would print nothing
        # until Ctrl-C, and at the pipe's default 80 columns).
        console = Console(width=WIDTH)
        with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
            while True:
                snap = _snapshot_offline(cfg)
                console.print(f"--- {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%SZ')}")
                console.print(renderable(snap))
                sys.stdout.flush()
                time.sleep(interval)
        return
    console = probe if probe.width <= WIDTH else Console(width=WIDTH)
    with contextlib.suppress(KeyboardInterrupt), Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(renderable(_snapshot_offline(cfg)), refresh=True)
            time.sleep(interval)


# ---------------------------------------------------------------------------------- operator


def _open_rw(cfg: Config) -> sqlite3.Connection:
    path = Path(cfg.buffer.path)
    if not path.exists():
        raise Failure(f"no buffer at {path} (check buffer.path in the config)")
    return buffer_operator.connect(path)


@cli.group("dead-letter")
def dead_letter() -> None:
    """Events the central side refused: list, show, retry, drop."""


@dead_letter.command("list")
@CONFIG_OPTION
@click.option("--stream", default=None)
@click.option("--json", "as_json", is_flag=True)
def dl_list(config_path: Path, stream: str | None, as_json: bool) -> None:
    """List dead letters (stream, sequence, id, when, reason)."""
    rows = buffer_operator.list_dead_letters(_open_rw(_load(config_path)), stream)
    if as_json:
        out = [
            {
                "stream": d.stream,
                "sequence": d.sequence,
                "id": d.id,
                "dead_at": d.dead_at,
                "status": d.status,
                "retry_requested": int(d.retry_requested),
                "reason": d.reason,
            }
            for d in rows
        ]
        click.echo(orjson.dumps(out).decode())
        return
    if not rows:
        click.echo("no dead letters")
        return
    for d in rows:
        when = datetime.fromtimestamp(d.dead_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        flag = " (retry requested)" if d.retry_requested else ""
        # the gateway's reason in full, on the same line (one line per dead letter, for grep)
        reason = " ".join((d.reason or "").split())
        click.echo(
            f"{d.stream}  #{d.sequence}  {d.id}  {when}  HTTP {d.status or '-'}{flag}  {reason}"
        )


def _dl_selection(
    ids: tuple[str, ...], all_: bool, stream: str | None
) -> buffer_operator.Selection:
    if not ids and not all_:
        raise click.UsageError("name event ids, or --all")
    return buffer_operator.Selection(ids=ids, all=all_, stream=stream)


@dead_letter.command("show")
@CONFIG_OPTION
@click.argument("event_id")
def dl_show(config_path: Path, event_id: str) -> None:
    """Print one dead letter: the reason and the event as it was sent."""
    d = buffer_operator.find_dead_letter(_open_rw(_load(config_path)), event_id)
    if d is None:
        raise Failure(f"no dead letter with id {event_id} (edge-agent dead-letter list)")
    click.echo(f"reason: {d.reason}\nstatus: {d.status}")
    click.echo(orjson.dumps(orjson.loads(d.body), option=orjson.OPT_INDENT_2).decode())


@dead_letter.command("retry")
@CONFIG_OPTION
@click.argument("event_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True)
@click.option("--stream", default=None)
def dl_retry(config_path: Path, event_ids: tuple[str, ...], all_: bool, stream: str | None) -> None:
    """Send dead letters again (same ids) once the central side is fixed."""
    which = _dl_selection(event_ids, all_, stream)
    n = buffer_operator.request_retry(_open_rw(_load(config_path)), which)
    click.echo(f"{n} dead letter(s) marked for retry; the running agent sends them within seconds")


@dead_letter.command("drop")
@CONFIG_OPTION
@click.argument("event_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True)
@click.option("--stream", default=None)
def dl_drop(config_path: Path, event_ids: tuple[str, ...], all_: bool, stream: str | None) -> None:
    """Delete dead letters for good (a running agent counts the freed room within a second)."""
    which = _dl_selection(event_ids, all_, stream)
    n = buffer_operator.drop_dead_letters(_open_rw(_load(config_path)), which)
    click.echo(f"{n} dead letter(s) dropped")


def _parse_time(value: str) -> float:
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("use ISO 8601, e.g. 2026-11-23T08:00:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@cli.command()
@CONFIG_OPTION
@click.option("--stream", required=True)
@click.option("--since", default=None, help="ISO 8601 time: replay events committed since then")
@click.option("--from-sequence", type=int, default=None, help="replay from this sequence on")
def replay(config_path: Path, stream: str, since: str | None, from_sequence: int | None) -> None:
    """Send already-forwarded events again (same ids), from those kept by keep_forwarded."""
    if (since is None) == (from_sequence is None):
        raise click.UsageError("give exactly one of --since or --from-sequence")
    since_ts = _parse_time(since) if since is not None else None
    cfg = _load(config_path)
    conn = _open_rw(cfg)
    try:
        buffer_operator.stream_cursor(conn, stream)
    except buffer_operator.UnknownStream as exc:
        known = ", ".join(exc.known) or "-"
        raise Failure(f"no stream '{stream}' in the buffer (streams: {known})") from None
    if cfg.buffer.keep_forwarded <= 0:
        # Rows acknowledged in the last second may still be in the file until housekeeping
        # deletes them; offering those would make the answer depend on timing.
        raise Failure(
            f"no forwarded events of stream {stream} are kept: buffer.keep_forwarded = 0 "
            'deletes them once forwarded (set it, e.g. "7d", to allow replays)'
        )
    queued = buffer_operator.request_replay(
        conn, stream, since=since_ts, from_sequence=from_sequence
    )
    if queued is None:
        raise Failure(
            f"no forwarded events of stream {stream} are kept in that range "
            f"(buffer.keep_forwarded = {cfg.buffer.keep_forwarded:g} s decides how long they stay)"
        )
    if from_sequence is not None and queued.first_seq > from_sequence:
        click.echo(f"note: events before sequence {queued.first_seq} are no longer kept", err=True)
    click.echo(
        f"replay of {queued.count} event(s) of stream {stream} "
        f"(sequences {queued.first_seq}-{queued.to_seq}) queued; "
        "the running agent sends them with their original ids"
    )


# ---------------------------------------------------------------------------------- demo


@cli.command()
@click.option("--duration", type=float, default=0, help="stop after this many seconds (0: Ctrl-C)")
@click.option("--rate", type=float, default=20.0, show_default=True, help="events per second")
@click.option("--outage-at", type=float, default=15.0, show_default=True, help="seconds; 0 = none")
@click.option("--outage-for", type=float, default=10.0, show_default=True, help="seconds")
@click.option("--dir", "workdir", type=click.Path(path_type=Path, file_okay=False), default=None)
def demo(
    duration: float, rate: float, outage_at: float, outage_for: float, workdir: Path | None
) -> None:
    """A local reference gateway plus an agent with a simulated production line."""
    from agent.demo import run_demo

    asyncio.run(run_demo(duration, rate, outage_at, outage_for, workdir))


BUG_REPORT = (
    "this is a bug in edge-agent, not a problem with your config or your systems: please "
    "report it to the edge-agent maintainers with this traceback and `edge-agent --version`"
)


def _cause(exc: BaseException) -> BaseException:
    """The error a task group wrapped: its first leaf that is not a cancellation."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (leaves or list(exc.exceptions))[0]
    return exc


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="edge-agent", standalone_mode=False)
    except BaseException as raised:  # noqa: BLE001 - every way out is decided here
        exc = _cause(raised)
        if isinstance(exc, SystemExit):
            raise exc from None
        if debug and not isinstance(
            exc, click.ClickException | click.exceptions.Abort | KeyboardInterrupt
        ):
            raise
        sys.exit(_report(exc, argv if argv is not None else sys.argv[1:]))
    sys.exit(0)


def _report(exc: BaseException, args: list[str]) -> int:
    """One line for an expected failure, and its exit code: 2 when the config or a file it
    names is at fault, 1 otherwise. Anything else is a bug: logged with its traceback."""
    if isinstance(exc, click.exceptions.Abort):
        click.echo("aborted", err=True)
        return 1
    if isinstance(exc, click.UsageError):
        # one line, like every expected error (click's own shows usage, hint and error)
        where = exc.ctx.command_path if exc.ctx is not None else "edge-agent"
        click.echo(f"Error: {exc.format_message().rstrip('.')} (see: {where} --help)", err=True)
        # a monitoring plugin's bad arguments are UNKNOWN (3); 2 would page as CRITICAL
        return 3 if where.endswith(" status") and "--check" in args else 2
    if isinstance(exc, click.ClickException):
        exc.show()
        return exc.exit_code
    if isinstance(exc, ConfigError):
        click.echo(f"config error: {exc}", err=True)
        return 2
    if isinstance(exc, EdgeAgentError):
        click.echo(f"error: {exc}", err=True)
        return 1
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, OSError):
        click.echo(f"error: {exc}", err=True)
        return 1
    logging.getLogger("edge_agent").error(
        "unexpected %s: %s; %s", type(exc).__name__, exc, BUG_REPORT, exc_info=exc
    )
    return 1  # with no handler set up yet, logging's last resort prints it to stderr


if __name__ == "__main__":
    main()
