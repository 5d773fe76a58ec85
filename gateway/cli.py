"""``edge-agent gateway``: serve the reference gateway; ``edge-agent gateway report``: read it.

The group serves when called without a subcommand, so ``edge-agent gateway --listen ...``
is the whole server. aiohttp is imported only when serving, to keep ``edge-agent --help``
fast. Exit codes as for the agent: 0 ok, 2 usage or config error, 1 runtime failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.tls import TlsFileError, client_context

_DEFAULT_DB = "gateway.sqlite3"


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"edge-agent gateway: {message}", err=True)
    sys.exit(code)


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8443 or [::1]:0)")
    port_n = int(port)
    if port_n > 65535:
        raise click.BadParameter(f"port {port_n} is over 65535")
    return host.strip("[]"), port_n


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        _fail(f"--token-file {path}: cannot read it ({exc.strerror}); check the path")
    if not token:
        _fail(f"--token-file {path}: the file is empty (put the bearer token in it)")
    return token


@click.group(invoke_without_command=True)
@click.option(
    "--listen",
    default="127.0.0.1:8443",
    show_default=True,
    metavar="HOST:PORT",
    help="Address to listen on; port 0 picks a free one (printed on start).",
)
@click.option(
    "--db",
    "db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=_DEFAULT_DB,
    show_default=True,
    help="The gateway's SQLite file.",
)
@click.option(
    "--cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Server certificate chain (PEM). Without it the gateway speaks plain HTTP.",
)
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Private key of --cert (PEM).",
)
@click.option(
    "--client-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA (PEM) that client certificates must chain to: requires mTLS.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the bearer token clients must send.",
)
@click.option(
    "--path",
    "url_path",
    default="/v1/batches",
    show_default=True,
    help="URL path batches are POSTed to.",
)
@click.option(
    "--fail-status",
    type=click.IntRange(100, 599),
    help="Answer batch requests with this status (failure injection).",
)
@click.option(
    "--fail-count",
    type=click.IntRange(-1),
    default=None,
    help="How many batch requests fail before recovering; -1 = forever (default "
    "when --fail-status is given).",
)
@click.option(
    "--retry-after",
    type=click.FloatRange(0),
    default=None,
    help="Seconds sent as Retry-After with injected failures.",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(0),
    default=0.0,
    help="Delay every batch request by this many milliseconds.",
)
@click.option(
    "--poison",
    multiple=True,
    metavar="VALUE",
    help="An event whose id or subject equals VALUE makes its batch 422 (repeatable).",
)
@click.option(
    "--drop-acks",
    type=click.IntRange(-1),
    default=0,
    help="Commit this many accepted batches, then cut the connection instead of answering "
    "(lost acknowledgements); -1 = forever.",
)
@click.option(
    "--control",
    is_flag=True,
    help="Enable GET/POST /control to change failure injection at runtime.",
)
@click.option(
    "--fsync",
    is_flag=True,
    help="synchronous=FULL: a 2xx survives power loss, not only a process crash.",
)
@click.option(
    "--max-body",
    type=click.IntRange(1024),
    default=64 * 1024 * 1024,
    show_default=True,
    help="Largest request body accepted, in bytes (413 above).",
)
@click.pass_context
def gateway(
    ctx: click.Context,
    listen: str,
    db: Path,
    cert: Path | None,
    key: Path | None,
    client_ca: Path | None,
    token_file: Path | None,
    url_path: str,
    fail_status: int | None,
    fail_count: int | None,
    retry_after: float | None,
    latency_ms: float,
    poison: tuple[str, ...],
    drop_acks: int,
    control: bool,
    fsync: bool,
    max_body: int,
) -> None:
    """Reference gateway: the central side of the HTTPS binding, for tests, demos and
    for checking a central receiver against the wire contract."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        host, port = _parse_listen(listen)
    except click.BadParameter as exc:
        _fail(f"--listen: {exc.message}")
    if (cert is None) != (key is None):
        _fail("--cert and --key go together (give both for HTTPS, neither for plain HTTP)")
    if client_ca is not None and cert is None:
        _fail("--client-ca needs --cert and --key: client certificates only exist over TLS")
    if not url_path.startswith("/"):
        _fail(f"--path: {url_path!r} must start with /")
    token = _read_token(token_file) if token_file is not None else None

    import asyncio
    import logging
    import ssl

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    from gateway.server import Faults, GatewaySettings, serve_forever
    from gateway.store import GatewayDbError

    faults = Faults(
        fail_status=fail_status,
        fail_count=(fail_count if fail_count is not None else -1) if fail_status else 0,
        retry_after=retry_after,
        latency_ms=latency_ms,
        poison=set(poison),
        drop_acks=drop_acks,
    )
    settings = GatewaySettings(
        host=host,
        port=port,
        db=db,
        path=url_path,
        cert=cert,
        key=key,
        client_ca=client_ca,
        token=token,
        control=control,
        fsync=fsync,
        max_body=max_body,
        faults=faults,
    )
    try:
        settings.ssl_context()
    except (ssl.SSLError, OSError) as exc:
        _fail(f"--cert/--key/--client-ca: cannot load ({exc}); give PEM files that match")
    try:
        asyncio.run(serve_forever(settings))
    except GatewayDbError as exc:
        _fail(f"--db {exc}")
    except OSError as exc:
        _fail(f"cannot listen on {listen}: {exc.strerror or exc} (pick another --listen)", 1)
    except KeyboardInterrupt:
        pass


def _print_report(db: Path, as_json: bool, check: bool) -> None:
    """The report of a gateway file, as text or JSON; exit 1 under --check when not ok."""
    from gateway.report import read_report, render_text
    from gateway.store import GatewayDbError

    try:
        data = read_report(db)
    except GatewayDbError as exc:
        _fail(f"report: {exc}")
    if as_json:
        import orjson

        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render_text(data))
    if check and not data["totals"]["ok"]:
        sys.exit(1)


@gateway.command()
@click.option(
    "--db",
    "db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=_DEFAULT_DB,
    show_default=True,
    help="The gateway's SQLite file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 when any stream has unexplained missing sequences or id conflicts.",
)
def report(db: Path, as_json: bool, check: bool) -> None:
    """Print what the gateway received, from its SQLite file (it may be running or not)."""
    _print_report(db, as_json, check)


@gateway.command()
@click.argument("url")
@click.option("--stream", required=True, help="The JetStream stream the agents publish into.")
@click.option(
    "--db",
    "db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=_DEFAULT_DB,
    show_default=True,
    help="The gateway's SQLite file to store into (the same file `gateway report` reads).",
)
@click.option(
    "--durable",
    default="edge-gateway-report",
    show_default=True,
    help="Name of the durable pull consumer (kept on the server: a rerun resumes).",
)
@click.option("--subject", default=None, help="Only this subject filter (default: the stream's).")
@click.option(
    "--follow",
    is_flag=True,
    help="Keep reading until interrupted, instead of stopping once the stream is read.",
)
@click.option(
    "--idle",
    type=click.FloatRange(0.1),
    default=2.0,
    show_default=True,
    help="Without --follow: stop after this many seconds with nothing pending.",
)
@click.option("--user", default=None, help="User name (with --password-file).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--creds",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A .creds file (NKey seed and user JWT).",
)
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 when any stream has unexplained missing sequences or id conflicts.",
)
def consume(
    url: str,
    stream: str,
    db: Path,
    durable: str,
    subject: str | None,
    follow: bool,
    idle: float,
    user: str | None,
    password_file: Path | None,
    token_file: Path | None,
    creds: Path | None,
    ca_file: Path | None,
    cert: Path | None,
    key: Path | None,
    as_json: bool,
    check: bool,
) -> None:
    """Read a NATS JetStream stream (URL: nats://host:4222[,nats://...]) into the gateway
    file, then print the same report as `gateway report`: received, duplicates, gaps per
    stream and epoch, checkpoints."""
    import asyncio
    import logging
    import signal
    import ssl

    from gateway.nats_consume import consume as run_consume
    from gateway.store import GatewayDbError

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    servers = [s.strip() for s in url.split(",") if s.strip()]
    if not servers or not all(s.startswith(("nats://", "tls://")) for s in servers):
        _fail(f"URL {url!r}: give nats://HOST:PORT or tls://HOST:PORT (comma-separated)")
    if (cert is None) != (key is None):
        _fail("--cert and --key go together (mutual TLS)")
    conn: dict[str, object] = {}
    if user:
        conn["user"] = user
        if password_file is not None:
            conn["password"] = password_file.read_text(encoding="utf-8").rstrip("\r\n")
    if token_file is not None:
        conn["token"] = _read_token(token_file)
    if creds is not None:
        conn["user_credentials"] = str(creds)
    if ca_file or cert or any(s.startswith("tls://") for s in servers):
        try:
            ctx = client_context(ca_file, cert_file=cert, key_file=key)
        except (OSError, ssl.SSLError, TlsFileError) as exc:
            _fail(f"--ca-file/--cert/--key: cannot load ({exc}); give PEM files that match")
        conn["tls"] = ctx

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_consume(
            servers,
            stream,
            db,
            durable=durable,
            subject=subject,
            until_idle=None if follow else idle,
            connect=conn,
            stop=stop,
        )

    try:
        asyncio.run(main())
    except GatewayDbError as exc:
        _fail(f"--db {exc}")
    except Exception as exc:  # noqa: BLE001 - the server's answer, on one line
        _fail(f"consume {url} stream {stream}: {type(exc).__name__}: {exc}", 1)
    _print_report(db, as_json, check)
