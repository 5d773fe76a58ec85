"""``edge-agent opcua ...``: browse a server, test a config, make the agent's certificate.

The lead attaches the ``opcua`` group to the main CLI (``main.add_command(opcua)``).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import click

from agent.errors import ConfigError, EdgeAgentError

from . import security
from .config import Config


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(name="opcua")
def opcua() -> None:
    """OPC UA tools: browse a server, test a source's config, make a certificate."""


@opcua.command()
@click.argument("endpoint")
@click.option("--path", "path", default=None, help="browse path to start at, e.g. Objects/2:Line1")
@click.option("--depth", default=1, show_default=True, help="levels below the start")
@click.option("--username", default=None, help="log in as this user (default anonymous)")
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--timeout", default=10.0, show_default=True, help="connect timeout, seconds")
def browse(
    endpoint: str,
    path: str | None,
    depth: int,
    username: str | None,
    password_file: Path | None,
    timeout: float,
) -> None:
    """List nodes of ENDPOINT (browse name, NodeId, data type, current value).

    Connects without message security; use `opcua test` for a secured config.
    """
    from .connection import close_quietly, open_client
    from .discovery import browse as do_browse
    from .discovery import format_rows

    try:
        cfg = Config.model_validate(
            {
                "endpoint": endpoint,
                "username": username,
                "password_file": password_file,
                "connect_timeout": timeout,
                "nodes": [{"node_id": "i=2253"}],
            }
        )
    except Exception as exc:  # noqa: BLE001 - pydantic's message is the useful part
        _fail(str(exc).splitlines()[-1] if str(exc) else repr(exc))
        return

    async def go() -> list[str]:
        client, _ = await open_client(cfg, "browse", Path("."))
        try:
            return format_rows(await do_browse(client, path, depth=depth))
        finally:
            await close_quietly(client)

    try:
        for line in asyncio.run(go()):
            click.echo(line)
    except EdgeAgentError as exc:
        _fail(str(exc))


@opcua.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="the agent's config file",
)
@click.option("--source", "only", default=None, help="test only this [sources.NAME]")
def test(config_path: Path, only: str | None) -> None:
    """Connect with each OPC UA source's security and read every configured node once."""
    from agent.config import load_config

    from .discovery import check_source

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
        return
    sources = {
        n: s
        for n, s in cfg.sources.items()
        if isinstance(s, Config) and (only is None or n == only)
    }
    if not sources:
        _fail(f"{config_path}: no OPC UA source{f' named {only}' if only else ''} configured")
    state_dir = cfg.buffer.path.parent  # as the runtime: adapter state next to the buffer
    failed = 0
    for name, scfg in sources.items():
        click.echo(f"[sources.{name}] {scfg.endpoint} ({scfg.security_policy}/{scfg.mode})")
        try:
            checks = asyncio.run(check_source(scfg, name, state_dir))
        except EdgeAgentError as exc:
            click.echo(f"  FAIL  connect: {exc}")
            failed += 1
            continue
        for c in checks:
            click.echo(f"  {'ok  ' if c.ok else 'FAIL'}  {c.label}: {c.detail}")
            failed += not c.ok
    if failed:
        click.echo(f"{failed} problem(s)", err=True)
        sys.exit(1)
    click.echo("all nodes readable")


@opcua.command(name="gen-cert")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="where cert.der, cert.pem and key.pem are written",
)
@click.option("--application-uri", default=None, help="default: urn:<hostname>:edge-agent")
@click.option("--hostname", default=None, help="DNS name in the certificate (default: this host)")
@click.option("--common-name", default="edge-agent", show_default=True)
@click.option("--organization", default=None)
@click.option("--days", default=730, show_default=True, help="validity")
@click.option("--force", is_flag=True, help="overwrite existing files")
def gen_cert(
    out_dir: Path,
    application_uri: str | None,
    hostname: str | None,
    common_name: str,
    organization: str | None,
    days: int,
    force: bool,
) -> None:
    """Make a self-signed OPC UA application instance certificate and key for the agent."""
    host = hostname or socket.gethostname()
    uri = application_uri or security.default_application_uri(host)
    cert_path, key_path = out_dir / "cert.der", out_dir / "key.pem"
    if not force and (cert_path.exists() or key_path.exists()):
        _fail(f"{cert_path} or {key_path} exists (use --force to replace them)")
    cert = security.generate_application_certificate(
        cert_path,
        key_path,
        application_uri=uri,
        hostname=host,
        common_name=common_name,
        organization=organization,
        days=days,
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    (out_dir / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    thumb = security.thumbprint(security.der_of(cert))
    click.echo(f"certificate      {cert_path} (and cert.pem)")
    click.echo(f"private key      {key_path}")
    click.echo(f"application URI  {uri}")
    click.echo(f"SHA-1 thumbprint {security.pretty_thumbprint(thumb)}")
    click.echo(f"valid until      {cert.not_valid_after_utc:%Y-%m-%d}")
    click.echo(
        "next: set certificate and private_key in [sources.NAME], and trust cert.der on "
        "the OPC UA server"
    )
