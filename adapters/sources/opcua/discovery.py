"""Discovery for plant IT: browse a server's address space, test a source's config.

``browse`` lists nodes with what a config needs (browse path, NodeId, data type, current
value), so nodes can be picked without another tool. ``check_source`` connects exactly as
the agent would (security, login) and reads every configured node once, reporting each one
that fails and why.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from cryptography import x509

from agent.errors import SourceError

from . import pki, security
from .config import Config, NodeConfig
from .connection import close_quietly, make_client, open_client, translate
from .mapping import rfc3339, status_name, to_json
from .source import resolve_node


@dataclass(frozen=True, slots=True)
class BrowseRow:
    path: str
    node_id: str
    node_class: str
    data_type: str
    value: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


async def _data_type_name(client: Client, node_id: ua.NodeId) -> str:
    if node_id.NamespaceIndex == 0 and isinstance(node_id.Identifier, int):
        try:
            return ua.VariantType(node_id.Identifier).name
        except ValueError:
            pass
    try:
        name = await client.get_node(node_id).read_browse_name()
        return str(name.Name)
    except Exception:  # noqa: BLE001 - a name is a courtesy
        return node_id.to_string()


async def browse(
    client: Client,
    path: str | None = None,
    *,
    depth: int = 1,
    limit: int = 2000,
    node_id: str | None = None,
) -> list[BrowseRow]:
    """Children of ``path`` (browse path from Root, default Objects) or of ``node_id``,
    down to ``depth``. Rows below a NodeId start have paths relative to it (``.../``)."""
    start = client.nodes.objects
    prefix = "Objects"
    if node_id:
        ns_array = await client.get_namespace_array()
        nid = await resolve_node(client, NodeConfig(node_id=node_id), ns_array)
        start = client.get_node(nid)
        try:
            bn = await start.read_browse_name()
        except ua.UaStatusCodeError as exc:
            raise SourceError(f"node '{node_id}' not found ({status_name(int(exc.code))})") from exc
        prefix = await _path_of(client, start) or (
            f"{bn.NamespaceIndex}:{bn.Name}" if bn.NamespaceIndex else bn.Name
        )
    elif path:
        parts = [p for p in path.strip("/").split("/") if p]
        if parts and parts[0] in ("Root", "0:Root"):
            parts = parts[1:]
        qualified = [p if ":" in p and p.split(":", 1)[0].isdigit() else f"0:{p}" for p in parts]
        try:
            start = await client.nodes.root.get_child(qualified)
        except ua.UaStatusCodeError as exc:
            raise SourceError(f"browse path '{path}' not found ({exc})") from exc
        prefix = "/".join(q[2:] if q.startswith("0:") else q for q in qualified)
    rows: list[BrowseRow] = []
    frontier = [(start, prefix)]
    for _ in range(depth):
        nxt = []
        for node, base in frontier:
            for child in await node.get_children():
                if len(rows) >= limit:
                    return rows
                bn = await child.read_browse_name()
                cls = await child.read_node_class()
                part = f"{bn.NamespaceIndex}:{bn.Name}" if bn.NamespaceIndex else bn.Name
                child_path = f"{base}/{part}"
                dtype, value = "", ""
                if cls == ua.NodeClass.Variable:
                    dtype = await _data_type_name(client, await child.read_data_type())
                    try:
                        dv = await child.read_data_value(raise_on_bad_status=False)
                        code = dv.StatusCode.value if dv.StatusCode is not None else 0
                        val = dv.Value.Value if dv.Value is not None else None
                        value = repr(to_json(val))[:60]
                        if code:
                            value += f" ({status_name(code)})"
                    except Exception as exc:  # noqa: BLE001 - shown, not fatal
                        value = f"<unreadable: {exc}>"
                rows.append(BrowseRow(child_path, child.nodeid.to_string(), cls.name, dtype, value))
                nxt.append((child, child_path))
        frontier = nxt
    return rows


async def _path_of(client: Client, node: Any) -> str | None:
    """Browse path from Objects to ``node`` (asyncua's get_path), or None when not under it."""
    try:
        parts = await node.get_path(max_length=20, as_string=True)
    except Exception:  # noqa: BLE001 - a path is a courtesy; the NodeId is what counts
        return None
    parts = [p.removeprefix("0:") for p in parts]
    if len(parts) < 2 or parts[0] != "Root" or parts[1] != "Objects":
        return None
    return "/".join(parts[1:])


def select(
    rows: Sequence[BrowseRow], globs: Sequence[str], variables_only: bool
) -> list[BrowseRow]:
    """Rows whose browse path matches one of ``globs`` (all when none), Variables only."""
    out = []
    for r in rows:
        if variables_only and r.node_class != "Variable":
            continue
        if globs and not any(fnmatch.fnmatchcase(r.path, g) for g in globs):
            continue
        out.append(r)
    return out


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stable_node_id(node_id: str, ns_array: Sequence[str]) -> str:
    """``ns=2;s=X`` as ``nsu=URI;s=X``: a namespace index may move when the server restarts."""
    nid = ua.NodeId.from_string(node_id)
    if nid.NamespaceIndex == 0 or nid.NamespaceIndex >= len(ns_array):
        return node_id
    return f"nsu={ns_array[nid.NamespaceIndex]};{node_id.split(';', 1)[1]}"


def _subject(path: str) -> str:
    """A browse path as an event subject: 'Objects/2:Line1/2:Counter' -> 'Line1/Counter'."""
    parts = path.split("/")
    if parts and parts[0] == "Objects":
        parts = parts[1:]
    return "/".join(p.split(":", 1)[1] if p.split(":", 1)[0].isdigit() else p for p in parts)


def source_toml(name: str, cfg: Config, rows: Sequence[BrowseRow], ns_array: Sequence[str]) -> str:
    """A ready ``[sources.NAME]`` block for the Variable rows, with cfg's security."""
    lines = [
        f"# written by `edge-agent opcua browse --toml` from {cfg.endpoint}",
        f"[sources.{name}]",
        'type = "opcua"',
        f"endpoint = {_toml_str(cfg.endpoint)}",
    ]
    if cfg.security_policy != "None":
        lines.append(f"security_policy = {_toml_str(cfg.security_policy)}")
        lines.append(f"security_mode = {_toml_str(cfg.mode)}")
        if cfg.pki_dir is not None:
            lines.append(f"pki_dir = {_toml_str(str(cfg.pki_dir))}")
        if cfg.server_thumbprint is not None:
            lines.append(f"server_thumbprint = {_toml_str(cfg.server_thumbprint)}")
        if cfg.certificate is not None and cfg.private_key is not None:
            lines.append(f"certificate = {_toml_str(str(cfg.certificate))}")
            lines.append(f"private_key = {_toml_str(str(cfg.private_key))}")
        if not cfg.require_crl:
            lines.append("require_crl = false")
    if cfg.username:
        lines.append(f"username = {_toml_str(cfg.username)}")
        if cfg.password_file is not None:
            lines.append(f"password_file = {_toml_str(str(cfg.password_file))}")
    lines.append("publishing_interval = 1.0")
    for r in rows:
        if r.node_class != "Variable":
            continue
        lines += [
            "",
            f"[[sources.{name}.nodes]]",
            f"# {r.path} ({r.data_type or 'unknown type'})",
            f"node_id = {_toml_str(stable_node_id(r.node_id, ns_array))}",
            f"name = {_toml_str(_subject(r.path))}",
            "sampling_interval = 1.0",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ endpoints


def _cert_info(blob: bytes) -> dict[str, Any]:
    if not blob:
        return {}
    chain = pki.split_chain(blob)
    try:
        cert = x509.load_der_x509_certificate(chain[0])
    except ValueError:
        return {"thumbprint": security.thumbprint(chain[0]), "error": "unparseable"}
    return {
        "thumbprint": security.pretty_thumbprint(security.thumbprint(chain[0])),
        "subject": security.subject_of(cert),
        "issuer": cert.issuer.rfc4514_string(),
        "self_signed": cert.issuer == cert.subject,
        "not_before": rfc3339(cert.not_valid_before_utc),
        "not_after": rfc3339(cert.not_valid_after_utc),
        "application_uri": security.application_uri_of(cert),
        "chain_length": len(chain),
    }


async def describe_endpoints(cfg: Config) -> list[dict[str, Any]]:
    """GetEndpoints on an unsecured channel (what every server answers), summarised."""
    client = make_client(cfg, "endpoints")
    try:
        import asyncio

        async with asyncio.timeout(cfg.connect_timeout):
            eps = await client.connect_and_get_server_endpoints()
    except Exception as exc:
        raise translate(exc, cfg) from exc
    finally:
        client.disconnect_socket()
    out = []
    for ep in eps:
        tokens = []
        for t in ep.UserIdentityTokens or []:
            kind = t.TokenType.name if hasattr(t.TokenType, "name") else str(t.TokenType)
            pol = (t.SecurityPolicyUri or "").rsplit("#", 1)[-1]
            tokens.append(f"{kind}{f' ({pol})' if pol else ''}")
        out.append(
            {
                "url": ep.EndpointUrl,
                "security_policy": (ep.SecurityPolicyUri or "").rsplit("#", 1)[-1],
                "security_mode": ep.SecurityMode.name.rstrip("_"),
                "security_level": ep.SecurityLevel,
                "user_tokens": tokens,
                "application_uri": ep.Server.ApplicationUri if ep.Server else None,
                "certificate": _cert_info(ep.ServerCertificate or b""),
            }
        )
    return out


def format_endpoints(eps: Sequence[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    certs: dict[str, dict[str, Any]] = {}
    for i, ep in enumerate(eps, 1):
        lines.append(
            f"[{i}] {ep['security_policy']},{ep['security_mode']}  level {ep['security_level']}"
            f"  {ep['url']}"
        )
        lines.append(f"    user tokens: {', '.join(ep['user_tokens']) or '-'}")
        c = ep["certificate"]
        if c:
            lines.append(f"    server certificate: SHA-1 {c['thumbprint']}")
            certs.setdefault(c["thumbprint"], c)
    for thumb, c in certs.items():
        lines += [
            f"server certificate {thumb}",
            f"    subject          {c.get('subject')}",
            f"    issuer           {c.get('issuer')}{' (self-signed)' if c.get('self_signed') else ''}",
            f"    valid            {c.get('not_before')} .. {c.get('not_after')}",
            f"    application URI  {c.get('application_uri')}",
        ]
    if eps:
        lines.append(f"server application URI: {eps[0]['application_uri']}")
    return lines


async def read_nodes(cfg: Config, node_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Read each node once (NodeId, nsu= form or browse path)."""
    client, _ = await open_client(cfg, "cli", Path("."), trust_hint=_hint(cfg))
    out: list[dict[str, Any]] = []
    try:
        ns_array = await client.get_namespace_array()
        for text in node_ids:
            spec = (
                NodeConfig(node_id=text)
                if "=" in text.split(";", 1)[0]
                else NodeConfig(browse_path=text)
            )
            try:
                nid = await resolve_node(client, spec, ns_array)
                dv = await client.get_node(nid).read_data_value(raise_on_bad_status=False)
            except SourceError as exc:
                out.append({"node": text, "error": str(exc)})
                continue
            except Exception as exc:  # noqa: BLE001 - reported per node
                out.append({"node": text, "error": str(translate(exc, cfg))})
                continue
            code = dv.StatusCode.value if dv.StatusCode is not None else 0
            out.append(
                {
                    "node": text,
                    "node_id": nid.to_string(),
                    "value": to_json(dv.Value.Value if dv.Value is not None else None),
                    "data_type": dv.Value.VariantType.name if dv.Value is not None else None,
                    "status": status_name(code),
                    "source_timestamp": rfc3339(dv.SourceTimestamp),
                    "server_timestamp": rfc3339(dv.ServerTimestamp),
                }
            )
    finally:
        await close_quietly(client)
    return out


def _hint(cfg: Config) -> str:
    return f"--pki {cfg.pki_dir}" if cfg.pki_dir is not None else ""


@dataclass(frozen=True, slots=True)
class NodeCheck:
    label: str
    ok: bool
    detail: str


async def check_source(
    cfg: Config,
    name: str,
    state_dir: Path,
    *,
    on_trust: Callable[[pki.Verdict], None] | None = None,
    trust_hint: str | None = None,
) -> list[NodeCheck]:
    """Connect as the agent would and read every configured node once.

    Raises SourceError (with the fix) when the connection itself fails.
    """
    client, _own = await open_client(cfg, name, state_dir, on_trust=on_trust, trust_hint=trust_hint)
    out: list[NodeCheck] = []
    try:
        ns_array = await client.get_namespace_array()
        for node in cfg.nodes:
            try:
                node_id = await resolve_node(client, node, ns_array)
                dv = await client.get_node(node_id).read_data_value(raise_on_bad_status=False)
            except SourceError as exc:
                out.append(NodeCheck(node.label, False, str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - reported per node
                out.append(NodeCheck(node.label, False, str(translate(exc, cfg))))
                continue
            code = dv.StatusCode.value if dv.StatusCode is not None else 0
            value = to_json(dv.Value.Value if dv.Value is not None else None)
            if code & 0x80000000:
                out.append(NodeCheck(node.label, False, f"read gives {status_name(code)}"))
            else:
                out.append(
                    NodeCheck(
                        node.label, True, f"{node_id.to_string()} = {value!r} ({status_name(code)})"
                    )
                )
    finally:
        await close_quietly(client)
    return out


def format_rows(rows: Sequence[BrowseRow]) -> list[str]:
    headers = ("BROWSE PATH", "NODE ID", "CLASS", "DATA TYPE", "VALUE")
    table = [headers, *[(r.path, r.node_id, r.node_class, r.data_type, r.value) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return [
        "  ".join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(row)).rstrip()
        for row in table
    ]
