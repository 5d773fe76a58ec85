"""``edge-agent opcua ...``: browse a server, test a config, make the agent's certificate.

The lead attaches the ``opcua`` group to the main CLI (``main.add_command(opcua)``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
from pathlib import Path

import click
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from agent.errors import ConfigError, EdgeAgentError

from . import security
from .config import Config


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(name="opcua")
def opcua() -> None:
    """OPC UA tools: browse a server, test a source's config, make a certificate."""


def _connection_options(f):  # noqa: ANN001, ANN201 - a click decorator
    """The security and login options shared by endpoints, browse, read and test."""
    opts = [
        click.option(
            "--security",
            default="None",
            show_default=True,
            metavar="POLICY,MODE",
            help="e.g. Basic256Sha256,SignAndEncrypt or Aes256_Sha256_RsaPss,Sign",
        ),
        click.option(
            "--pki",
            "pki_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Part 12 PKI folder to check the server's certificate (and keep ours in own/)",
        ),
        click.option("--server-thumbprint", default=None, help="or pin the server certificate"),
        click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), default=None),
        click.option("--key", type=click.Path(dir_okay=False, path_type=Path), default=None),
        click.option("--application-uri", default=None, help="must match --cert's URI"),
        click.option(
            "--no-require-crl",
            is_flag=True,
            help="accept a CA-signed server certificate whose CA has no CRL in the PKI",
        ),
        click.option("--user", "username", default=None, help="log in as this user"),
        click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--timeout", default=10.0, show_default=True, help="seconds"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _adhoc_config(endpoint: str, kw: dict, nodes: list[str] | None = None) -> Config:
    """A Config for a one-off connection from the command-line options."""
    policy, _, mode = (kw.pop("security") or "None").partition(",")
    data = {
        "endpoint": endpoint,
        "security_policy": policy.strip() or "None",
        "security_mode": mode.strip() or None,
        "pki_dir": kw.pop("pki_dir"),
        "server_thumbprint": kw.pop("server_thumbprint"),
        "certificate": kw.pop("cert"),
        "private_key": kw.pop("key"),
        "application_uri": kw.pop("application_uri"),
        "require_crl": not kw.pop("no_require_crl"),
        "username": kw.pop("username"),
        "password_file": kw.pop("password_file"),
        "connect_timeout": kw.pop("timeout"),
        "nodes": [{"node_id": n} for n in (nodes or ["i=2258"])],
    }
    try:
        return Config.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg.replace(
            "pki_dir (or trusted_certs_dir, or server_thumbprint)",
            "--pki DIR or --server-thumbprint",
        )
        _fail(f"{where + ': ' if where else ''}{msg}")
        raise AssertionError from exc  # not reached


def _open(cfg: Config, on_trust=None):  # noqa: ANN001, ANN202
    from .connection import open_client

    return open_client(
        cfg,
        "cli",
        Path("."),
        on_trust=on_trust,
        trust_hint=f"--pki {cfg.pki_dir}" if cfg.pki_dir else "",
    )


def _run(coro):  # noqa: ANN001, ANN202
    try:
        return asyncio.run(coro)
    except EdgeAgentError as exc:
        _fail(str(exc))


@opcua.command()
@click.argument("endpoint")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--timeout", default=10.0, show_default=True, help="seconds")
def endpoints(endpoint: str, as_json: bool, timeout: float) -> None:
    """What ENDPOINT offers: security policies and modes, user token types, and the
    server certificate (thumbprint, subject, issuer, validity, application URI)."""
    from .discovery import describe_endpoints, format_endpoints

    try:
        cfg = Config.model_validate(
            {"endpoint": endpoint, "connect_timeout": timeout, "nodes": [{"node_id": "i=2258"}]}
        )
    except ValidationError as exc:
        _fail(exc.errors()[0]["msg"].removeprefix("Value error, "))
        return
    found = _run(describe_endpoints(cfg))
    if as_json:
        click.echo(json.dumps(found, indent=2))
    else:
        for line in format_endpoints(found):
            click.echo(line)


@opcua.command()
@click.argument("endpoint")
@click.option("--node", "node_id", default=None, help="NodeId to start at, e.g. ns=2;s=Line1")
@click.option("--path", "path", default=None, help="browse path to start at, e.g. Objects/2:Line1")
@click.option("--depth", default=1, show_default=True, help="levels below the start")
@click.option("--match", "globs", multiple=True, help="keep browse paths matching this glob")
@click.option("--variables-only", is_flag=True, help="keep Variable nodes only")
@click.option("--json", "as_json", is_flag=True, help="rows as JSON")
@click.option("--toml", "as_toml", is_flag=True, help="a ready [sources.NAME] block")
@click.option("--name", "source_name", default="opcua1", show_default=True, help="for --toml")
@click.option("--limit", default=5000, show_default=True, help="at most this many nodes")
@_connection_options
def browse(
    endpoint: str,
    node_id: str | None,
    path: str | None,
    depth: int,
    globs: tuple[str, ...],
    variables_only: bool,
    as_json: bool,
    as_toml: bool,
    source_name: str,
    limit: int,
    **conn: object,
) -> None:
    """List nodes of ENDPOINT (browse path, NodeId, class, data type, current value).

    With --toml, print a [sources.NAME] block monitoring the chosen nodes (by --match glob on
    the browse path, --variables-only), with the security options used here; paste it into
    the agent's config.
    """
    from .discovery import browse as do_browse
    from .discovery import format_rows, select, source_toml

    if as_json and as_toml:
        _fail("choose --json or --toml, not both")
    if node_id and path:
        _fail("choose --node or --path, not both")
    cfg = _adhoc_config(endpoint, conn)

    async def go():  # noqa: ANN202
        client, _ = await _open(cfg)
        try:
            rows = await do_browse(client, path, depth=depth, limit=limit, node_id=node_id)
            ns = await client.get_namespace_array()
            return rows, ns
        finally:
            await close_quietly(client)

    from .connection import close_quietly

    rows, ns_array = _run(go())
    rows = select(rows, globs, variables_only)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    elif as_toml:
        if not any(r.node_class == "Variable" for r in rows):
            _fail("no Variable node chosen: widen --match or --depth")
        click.echo(source_toml(source_name, cfg, rows, ns_array), nl=False)
    else:
        for line in format_rows(rows):
            click.echo(line)


@opcua.command()
@click.argument("endpoint")
@click.argument("node_ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@_connection_options
def read(endpoint: str, node_ids: tuple[str, ...], as_json: bool, **conn: object) -> None:
    """Read the current value of NODE_IDS (ns=2;s=X, nsu=URI;s=X or a browse path)."""
    from .discovery import read_nodes

    cfg = _adhoc_config(endpoint, conn)
    rows = _run(read_nodes(cfg, list(node_ids)))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    bad = 0
    for r in rows:
        if "error" in r or r["status"].startswith("Bad"):
            bad += 1
            click.echo(f"{r['node']}  ERROR {r.get('error') or r['status']}")
        else:
            click.echo(
                f"{r['node']}  {r['value']!r}  {r['status']}  source={r['source_timestamp']}"
            )
    if bad:
        sys.exit(1)


@opcua.command()
@click.argument("endpoint", required=False)
@click.argument("node_ids", nargs=-1)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="the agent's config file: test its OPC UA sources",
)
@click.option("--source", "only", default=None, help="test only this [sources.NAME]")
@_connection_options
def test(
    endpoint: str | None,
    node_ids: tuple[str, ...],
    config_path: Path | None,
    only: str | None,
    **conn: object,
) -> None:
    """Connect as the agent would and read every node once.

    Either -c CONFIG (each OPC UA source with its own security), or ENDPOINT [NODE_IDS...]
    with the security options (default: read the server's CurrentTime).
    """
    from .discovery import check_source

    if (config_path is None) == (endpoint is None):
        _fail("give -c CONFIG or an ENDPOINT (not both)")
    if config_path is not None:
        from agent.config import load_config

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
        hint = f"-c {config_path} --source "
    else:
        sources = {"cli": _adhoc_config(endpoint, conn, list(node_ids) or None)}
        state_dir = Path(".")
        hint = ""
    failed = 0
    for name, scfg in sources.items():
        click.echo(f"[sources.{name}] {scfg.endpoint} ({scfg.security_policy}/{scfg.mode})")
        trust_notes: list[str] = []

        def on_trust(v, notes=trust_notes) -> None:  # noqa: ANN001
            notes.append(f"server certificate trusted by {v.trusted_by}")
            notes.extend(f"warning: {w}" for w in v.warnings)

        trust_hint = f"{hint}{name}" if hint else (f"--pki {scfg.pki_dir}" if scfg.pki_dir else "")
        try:
            checks = asyncio.run(
                check_source(scfg, name, state_dir, on_trust=on_trust, trust_hint=trust_hint)
            )
        except EdgeAgentError as exc:
            click.echo(f"  FAIL  connect: {exc}")
            failed += 1
            continue
        for note in trust_notes:
            click.echo(f"  ok    {note}" if not note.startswith("warning") else f"  WARN  {note}")
        for c in checks:
            click.echo(f"  {'ok  ' if c.ok else 'FAIL'}  {c.label}: {c.detail}")
            failed += not c.ok
    if failed:
        click.echo(f"{failed} problem(s)", err=True)
        sys.exit(1)
    click.echo("all nodes readable")


@opcua.command()
@click.argument("files", nargs=-1, required=True)
@click.option(
    "--pki",
    "pki_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="the Part 12 PKI folder (pki_dir)",
)
@click.option(
    "--dir",
    "flat_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="a flat trusted_certs_dir",
)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--source", "source", default=None, help="with -c: the [sources.NAME]")
@click.option(
    "--issuer",
    is_flag=True,
    help="a CA only needed to build chains: into issuers/ (not trusted by itself)",
)
def trust(
    files: tuple[str, ...],
    pki_dir: Path | None,
    flat_dir: Path | None,
    config_path: Path | None,
    source: str | None,
    issuer: bool,
) -> None:
    """Trust a server certificate or a CA (FILES: DER/PEM certificates, CRLs, or thumbprints
    of certificates in rejected/).

    A certificate goes into trusted/certs (issuers/certs with --issuer) and leaves rejected/;
    a CRL goes into trusted/crl (issuers/crl with --issuer).
    """
    from . import pki

    if config_path is not None:
        from agent.config import load_config

        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            _fail(str(exc))
            return
        found = {n: s for n, s in cfg.sources.items() if isinstance(s, Config)}
        if source is None and len(found) == 1:
            source = next(iter(found))
        if source not in found:
            _fail(f"{config_path}: name the OPC UA source with --source ({', '.join(found)})")
        pki_dir, flat_dir = found[source].pki_dir, found[source].trusted_certs_dir
        if pki_dir is None and flat_dir is None:
            _fail(f"[sources.{source}] has no pki_dir or trusted_certs_dir: set pki_dir first")
    if (pki_dir is None) == (flat_dir is None):
        _fail("give one of --pki DIR, --dir DIR or -c CONFIG --source NAME")
    if pki_dir is not None:
        pki.ensure_layout(pki_dir)
    for item in files:
        path = Path(item)
        if not path.is_file() and pki_dir is not None:
            thumb = item.replace(":", "").upper()
            candidate = pki_dir / "rejected" / f"{thumb}.der"
            if candidate.is_file():
                path = candidate
        if not path.is_file():
            _fail(f"{item}: no such file (nor a thumbprint of a certificate in rejected/)")
        try:
            crl = pki.load_crl(path)
        except ValueError:
            crl = None
        if crl is not None:
            if pki_dir is None:
                _fail(f"{path}: a CRL needs a PKI folder (--pki), not a flat trusted folder")
            dest = pki_dir / ("issuers" if issuer else "trusted") / "crl" / path.name
            shutil.copyfile(path, dest)
            click.echo(f"CRL of {crl.issuer.rfc4514_string()} -> {dest}")
            continue
        try:
            cert = security.load_certificate(path)
        except (OSError, ValueError):
            _fail(f"{path}: neither a certificate nor a CRL (DER or PEM)")
            return
        der = security.der_of(cert)
        thumb = security.thumbprint(der)
        if pki_dir is not None:
            folder = pki_dir / ("issuers" if issuer else "trusted") / "certs"
        else:
            assert flat_dir is not None
            flat_dir.mkdir(parents=True, exist_ok=True)
            folder = flat_dir
        dest = folder / f"{thumb}.der"
        dest.write_bytes(der)
        if path.parent.name == "rejected" and path.resolve() != dest.resolve():
            path.unlink()
        kind = "CA" if pki.is_ca(cert) else "certificate"
        click.echo(
            f"{'issuer ' if issuer else 'trusted '}{kind} {security.subject_of(cert)} "
            f"(SHA-1 {security.pretty_thumbprint(thumb)}) -> {dest}"
        )


@opcua.command(name="gen-cert")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="where cert.der, cert.pem and key.pem are written",
)
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="certificate file instead of OUT_DIR/cert.der",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="key file instead of OUT_DIR/key.pem",
)
@click.option("--application-uri", default=None, help="default: urn:<hostname>:edge-agent")
@click.option("--hostname", default=None, help="DNS name in the certificate (default: this host)")
@click.option("--common-name", default="edge-agent", show_default=True)
@click.option("--organization", default=None)
@click.option("--days", default=730, show_default=True, help="validity")
@click.option("--force", is_flag=True, help="overwrite existing files")
@click.option(
    "--renew",
    is_flag=True,
    help="replace the existing certificate by a new one with the same application URI, "
    "host name and subject (the old files are kept as *.old)",
)
def gen_cert(
    out_dir: Path,
    cert_file: Path | None,
    key_file: Path | None,
    application_uri: str | None,
    hostname: str | None,
    common_name: str,
    organization: str | None,
    days: int,
    force: bool,
    renew: bool,
) -> None:
    """Make a self-signed OPC UA application instance certificate and key for the agent."""
    cert_path = cert_file or out_dir / "cert.der"
    key_path = key_file or out_dir / "key.pem"
    if renew:
        if not cert_path.is_file():
            _fail(f"--renew: {cert_path} does not exist (make one without --renew)")
        try:
            old = security.load_certificate(cert_path)
        except (OSError, ValueError) as exc:
            _fail(f"--renew: cannot read {cert_path}: {exc}")
            return
        application_uri = application_uri or security.application_uri_of(old)
        if hostname is None:
            san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = [d for d in san.get_values_for_type(x509.DNSName) if d != "localhost"]
            hostname = dns[0] if dns else None
        common_name = security.common_name_of(old) or common_name
        if organization is None:
            orgs = old.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
            organization = str(orgs[0].value) if orgs else None
        for p in (cert_path, key_path):
            if p.exists():
                p.replace(p.with_name(p.name + ".old"))
    elif not force and (cert_path.exists() or key_path.exists()):
        _fail(f"{cert_path} or {key_path} exists (use --force to replace, --renew to renew)")
    host = hostname or socket.gethostname()
    uri = application_uri or security.default_application_uri(host)
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

    pem = cert_path.with_suffix(".pem") if cert_path.suffix.lower() == ".der" else None
    if pem is not None:
        pem.write_bytes(cert.public_bytes(Encoding.PEM))
    thumb = security.thumbprint(security.der_of(cert))
    click.echo(f"certificate      {cert_path}{f' (and {pem.name})' if pem else ''}")
    click.echo(f"private key      {key_path}")
    click.echo(f"application URI  {uri}")
    click.echo(f"SHA-1 thumbprint {security.pretty_thumbprint(thumb)}")
    click.echo(f"valid until      {cert.not_valid_after_utc:%Y-%m-%d}")
    if renew:
        click.echo(
            "renewed: the old files are kept as *.old; trust the new certificate on the OPC UA "
            "server before the old one expires"
        )
    else:
        click.echo(
            "next: set certificate and private_key in [sources.NAME], and trust cert.der on "
            "the OPC UA server"
        )
