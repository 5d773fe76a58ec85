"""Open everything `run` would open, start nothing: what `config check` and `run` share.

A config can be valid and still not run: a CA file in DER, a key that belongs to another
certificate, a buffer directory that cannot be created, a port another process holds.
Pydantic checks the shape of the file; this module checks the world the file names, and
reports every problem as one line naming the key path and the fix. `run` performs the
same checks before it opens anything, so what `config check` calls ok, `run` can open.

The core checks its own sections ([buffer], [metrics]); each adapter's config model checks
its own keys in ``preflight(check)`` (``agent.config.SourceConfig``/``SinkConfig``), so
this module knows no adapter key.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sqlite3
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config


@dataclass(frozen=True, slots=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    #: facts worth a line that are not problems (a port held by this config's own agent)
    notes: list[Problem] = field(default_factory=list)


def running_agent_pid(buffer_path: Path) -> int | None:
    """The pid of the agent running with this buffer, from its heartbeat, if one runs."""
    from agent.heartbeat import read_heartbeat
    from agent.status import HEARTBEAT_INTERVAL, pid_alive

    hb = read_heartbeat(buffer_path)
    if not hb or hb.get("stopped") or not pid_alive(hb.get("pid")):
        return None
    if time.time() - float(hb.get("at", 0)) > 3 * HEARTBEAT_INTERVAL + 2:
        return None
    return int(hb["pid"])


def _socket_inodes_of(pid: int) -> set[str] | None:
    """Inodes of the sockets a process holds; None when /proc does not tell us."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    out: set[str] = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                out.add(link[8:-1])
    return out


def _listening_inodes(port: int) -> set[str]:
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                cols = line.split()
                # local_address is HEXIP:HEXPORT; state 0A is LISTEN
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    out.add(cols[9])
    return out


def _held_by(pid: int, port: int) -> bool:
    """True when ``pid`` holds the listening socket on ``port`` (or /proc cannot say)."""
    mine = _socket_inodes_of(pid)
    if mine is None:
        return True  # another user's process: the heartbeat is the best evidence we have
    return bool(mine & _listening_inodes(port))


def _what_failed(exc: OSError) -> str:
    return exc.strerror or str(exc)


class Check:
    """Collects problems under a key prefix; adapters call it with their own key names."""

    def __init__(
        self, report: Report, prefix: str, own_pid: int | None, for_run: bool = False
    ) -> None:
        self._report = report
        self.prefix = prefix
        self.own_pid = own_pid
        #: checking for `run` (not `config check`): what run handles itself is not a problem
        self.for_run = for_run

    def at(self, prefix: str) -> Check:
        return Check(
            self._report,
            f"{self.prefix}.{prefix}" if self.prefix else prefix,
            self.own_pid,
            self.for_run,
        )

    def problem(self, key: str, message: str) -> None:
        self._report.problems.append(Problem(self._key(key), message))

    def note(self, key: str, message: str) -> None:
        self._report.notes.append(Problem(self._key(key), message))

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix and key else (key or self.prefix)

    # ---------------------------------------------------------------- plain files

    def readable_file(self, key: str, path: Path) -> bytes | None:
        """The file's bytes, or None after reporting why it cannot be read."""
        try:
            return path.read_bytes()
        except FileNotFoundError:
            self.problem(key, f"no such file: {path} (check the path)")
        except IsADirectoryError:
            self.problem(key, f"{path} is a directory, not a file (name the file in it)")
        except PermissionError:
            self.problem(
                key, f"cannot read {path}: permission denied (make it readable by the agent's user)"
            )
        except OSError as exc:
            self.problem(key, f"cannot read {path}: {_what_failed(exc)}")
        return None

    def secret_file(self, key: str, path: Path | None) -> None:
        """A token or password file: readable, and not empty."""
        if path is None:
            return
        data = self.readable_file(key, path)
        if data is None:
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.problem(key, f"{path} is not UTF-8 text (write the secret as plain text)")
            return
        if not text.strip():
            self.problem(key, f"{path} is empty (write the secret into it)")

    # ---------------------------------------------------------------- TLS

    def _certificates(self, key: str, path: Path, *, der_ok: bool = False) -> list[Any] | None:
        """Parse the certificates in a file; report and return None if there are none."""
        from cryptography import x509

        data = self.readable_file(key, path)
        if data is None:
            return None
        if b"-----BEGIN CERTIFICATE-----" in data:
            try:
                return list(x509.load_pem_x509_certificates(data))
            except ValueError as exc:
                self.problem(key, f"{path}: a PEM certificate in it is damaged ({exc})")
                return None
        try:
            cert = x509.load_der_x509_certificate(data)
        except ValueError:
            cert = None
        if cert is not None and der_ok:
            return [cert]
        if cert is not None:
            self.problem(
                key,
                f"{path} is a DER certificate; edge-agent needs PEM: convert it with "
                f"`openssl x509 -inform der -in {path} -out {path.with_suffix('.pem')}` "
                "and point the key at the .pem",
            )
        elif b"PRIVATE KEY-----" in data:
            self.problem(key, f"{path} holds a private key, not a certificate (swap the files?)")
        else:
            self.problem(
                key,
                f"{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----; "
                "export the certificate as PEM)",
            )
        return None

    def ca_bundle(self, key: str, path: Path | None) -> None:
        """A CA bundle: at least one PEM certificate, and loadable the way run loads it."""
        if path is None:
            return
        if self._certificates(key, path) is None:
            return
        try:
            ssl.create_default_context(cafile=str(path))
        except (ssl.SSLError, OSError) as exc:
            self.problem(key, f"{path} cannot be loaded as a CA bundle: {exc}")

    def _private_key(self, key: str, path: Path) -> Any | None:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        data = self.readable_file(key, path)
        if data is None:
            return None
        if b"PRIVATE KEY-----" not in data:
            hint = (
                "it holds a certificate (swap the files?)"
                if b"-----BEGIN CERTIFICATE-----" in data
                else "expected -----BEGIN PRIVATE KEY-----; a DER key converts with "
                f"`openssl pkey -inform der -in {path} -out {path.with_suffix('.pem')}`"
            )
            self.problem(key, f"{path} holds no PEM private key ({hint})")
            return None
        try:
            return load_pem_private_key(data, password=None)
        except TypeError:
            self.problem(
                key,
                f"{path} is encrypted with a passphrase, which the agent cannot type: decrypt "
                f"it with `openssl pkey -in {path} -out {path.with_suffix('.plain.pem')}`",
            )
        except (ValueError, Exception) as exc:  # cryptography raises several kinds
            self.problem(key, f"{path}: damaged private key ({exc})")
        return None

    def cert_and_key(
        self,
        cert_key: str,
        cert: Path | None,
        key_key: str,
        key: Path | None,
        *,
        der_ok: bool = False,
    ) -> Any | None:
        """A certificate (chain) and its private key: both parse, and the key matches.
        Returns the (first) certificate when all is well, for the adapter's own checks."""
        if cert is None or key is None:
            return None
        certs = self._certificates(cert_key, cert, der_ok=der_ok)
        private = self._private_key(key_key, key)
        if not certs or private is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        def pub(k: Any) -> bytes:
            return bytes(k.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))

        if pub(certs[0].public_key()) != pub(private.public_key()):
            self.problem(
                key_key,
                f"{key} does not match the certificate in {cert} (use the key the certificate "
                "was issued for)",
            )
            return None
        if not der_ok:
            try:
                ssl.create_default_context().load_cert_chain(str(cert), str(key))
            except (ssl.SSLError, OSError) as exc:
                self.problem(cert_key, f"{cert} and {key} cannot be loaded together: {exc}")
                return None
        return certs[0]

    # ---------------------------------------------------------------- directories

    def _probe_write(self, directory: Path) -> OSError | None:
        """Create and delete a file in ``directory``: the only honest writability test."""
        try:
            fd, name = tempfile.mkstemp(prefix=".edge-agent-check-", dir=directory)
        except OSError as exc:
            return exc
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
        return None

    def directory(self, key: str, path: Path, *, writable: bool = False) -> bool:
        """An existing directory (and one the agent can write to)."""
        if not path.exists():
            self.problem(key, f"no such directory: {path} (create it, or fix the path)")
            return False
        if not path.is_dir():
            self.problem(key, f"{path} is not a directory (name a directory)")
            return False
        if not os.access(path, os.R_OK | os.X_OK):
            self.problem(key, f"cannot read directory {path}: permission denied")
            return False
        if writable and (exc := self._probe_write(path)) is not None:
            self.problem(
                key,
                f"cannot write in {path}: {_what_failed(exc)} (give the agent's user write access)",
            )
            return False
        return True

    def creatable_directory(self, key: str, path: Path) -> bool:
        """A directory that exists and is writable, or can be created (as run creates it)."""
        if path.exists():
            return self.directory(key, path, writable=True)
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            self.problem(
                key, f"cannot create {path}: {ancestor} is a file, not a directory (fix the path)"
            )
            return False
        if (exc := self._probe_write(ancestor)) is not None:
            self.problem(
                key,
                f"cannot create {path}: {ancestor} is not writable ({_what_failed(exc)}); "
                "create the directory for the agent's user, or fix the path",
            )
            return False
        return True

    # ---------------------------------------------------------------- sockets

    def listen(self, key: str, host: str, port: int) -> None:
        """The address can be bound (or is held by this config's own running agent)."""
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            self.problem(key, f"cannot resolve {host}: {exc.strerror} (use an IP address)")
            return
        for family, type_, proto, _, addr in infos:
            s = socket.socket(family, type_, proto)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    if port and self.own_pid is not None and _held_by(self.own_pid, port):
                        self.note(key, f"{where} is held by this config's running agent "
                                       f"(pid {self.own_pid})")  # fmt: skip
                    else:
                        self.problem(
                            key,
                            f"{where} is in use by another process (pick a free port, or stop "
                            f"that process: ss -ltnp 'sport = :{port}')",
                        )
                elif exc.errno == errno.EADDRNOTAVAIL:
                    self.problem(key, f"{host} is not an address of this host (fix the address)")
                elif exc.errno == errno.EACCES:
                    self.problem(
                        key, f"cannot listen on {where}: permission denied (use a port >= 1024)"
                    )
                else:
                    self.problem(key, f"cannot listen on {where}: {_what_failed(exc)}")
                return
            finally:
                s.close()

    # ---------------------------------------------------------------- the buffer

    def buffer_file(self, key: str, path: Path) -> None:
        """The buffer: its directory can be created and written, and an existing file is
        an edge-agent buffer whose schema this version understands."""
        from agent.buffer.schema import SCHEMA_VERSION, read_file_schema

        if not self.creatable_directory(key, path.parent):
            return
        if not path.exists():
            return
        if path.is_dir():
            self.problem(key, f"{path} is a directory (name a file, e.g. {path}/buffer.db)")
            return
        try:
            with open(path, "r+b") as f:
                head = f.read(16)
        except OSError as exc:
            self.problem(
                key,
                f"cannot open {path} for writing: {_what_failed(exc)} (the agent's user must "
                "own it: chown edge-agent and chmod 600)",
            )
            return
        if not head:
            return  # an empty file becomes a new buffer
        damaged = (
            f"{path} is not a readable SQLite buffer (damaged, or another kind of file): run "
            f"will move it aside to {path.name}.corrupt-TIMESTAMP, say so and stop; the next "
            "start begins a new buffer (recover events from the old file with: sqlite3 FILE "
            ".recover)"
        )
        if head != b"SQLite format 3\0":
            # `run` leaves this to Buffer.open, which quarantines it: nothing is deleted
            if not self.for_run:
                self.problem(key, damaged)
            return
        try:
            found = read_file_schema(path)
        except sqlite3.DatabaseError:
            if not self.for_run:
                self.problem(key, damaged)
            return
        if found.version > SCHEMA_VERSION:
            self.problem(
                key,
                f"{path} has buffer schema {found.version}, newer than this agent's "
                f"({SCHEMA_VERSION}): upgrade edge-agent or set buffer.path elsewhere",
            )
        elif found.version == 0 and found.has_tables:
            self.problem(
                key,
                f"{path} is an SQLite database but not an edge-agent buffer: set buffer.path "
                "to another file",
            )


# -------------------------------------------------------------------- ordering, entry point


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")


def _clean(name: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in name.split("."))


def _key_lines(text: str) -> dict[str, int]:
    """Key path -> the line it is first written on (tables, array tables and keys)."""
    lines: dict[str, int] = {}
    table = ""
    arrays: dict[str, int] = {}
    for number, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("#"):
            continue
        if m := _HEADER.match(line):
            name = _clean(m.group(2))
            if m.group(1) == "[[":
                index = arrays.get(name, -1) + 1
                arrays[name] = index
                table = f"{name}[{index}]"
            else:
                table = name
            lines.setdefault(table, number)
            parts = table.split(".")
            for i in range(1, len(parts)):
                lines.setdefault(".".join(parts[:i]), number)
        elif m := _KEY.match(line):
            key = _clean(m.group(1))
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


def _in_file_order(problems: list[Problem], text: str) -> list[Problem]:
    order = _key_lines(text)

    def rank(p: Problem) -> int:
        key = p.key
        while key:
            if key in order:
                return order[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return len(text)  # a default the file does not mention: after what it does

    return sorted(problems, key=rank)


def preflight(
    cfg: Config,
    config_path: Path | None = None,
    *,
    for_run: bool = False,
    own_pid: int | None = None,
) -> Report:
    """Every problem `run` would hit opening what ``cfg`` names, in the file's order.

    ``own_pid`` is the agent whose ports are not problems: by default the one running with
    this buffer (from its heartbeat); a running agent reloading passes its own pid."""
    report = Report()
    if own_pid is None:
        own_pid = running_agent_pid(Path(cfg.buffer.path))
    root = Check(report, "", own_pid, for_run)
    root.buffer_file("buffer.path", Path(cfg.buffer.path))
    if cfg.metrics.enabled:
        host, _, port = cfg.metrics.listen.rpartition(":")
        root.listen("metrics.listen", host.strip("[]"), int(port))
    for name, sink in cfg.sinks.items():
        sink.preflight(root.at(f"sinks.{name}"))
    for name, source in cfg.sources.items():
        if source.enabled:
            source.preflight(root.at(f"sources.{name}"))
    text = ""
    if config_path is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = config_path.read_text(encoding="utf-8")
    report.problems = _in_file_order(report.problems, text)
    return report
