"""Discovery for plant IT: browse a server's address space, test a source's config.

``browse`` lists nodes with what a config needs (browse path, NodeId, data type, current
value), so nodes can be picked without another tool. ``check_source`` connects exactly as
the agent would (security, login) and reads every configured node once, reporting each one
that fails and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from asyncua import Client, ua

from agent.errors import SourceError

from .config import Config
from .connection import close_quietly, open_client, translate
from .mapping import status_name, to_json
from .source import resolve_node


@dataclass(frozen=True, slots=True)
class BrowseRow:
    path: str
    node_id: str
    node_class: str
    data_type: str
    value: str


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
    client: Client, path: str | None = None, *, depth: int = 1, limit: int = 2000
) -> list[BrowseRow]:
    """Children of ``path`` (browse path from Root, default Objects) down to ``depth``."""
    start = client.nodes.objects
    prefix = "Objects"
    if path:
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


@dataclass(frozen=True, slots=True)
class NodeCheck:
    label: str
    ok: bool
    detail: str


async def check_source(cfg: Config, name: str, state_dir: Path) -> list[NodeCheck]:
    """Connect as the agent would and read every configured node once.

    Raises SourceError (with the fix) when the connection itself fails.
    """
    client, _own = await open_client(cfg, name, state_dir)
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
