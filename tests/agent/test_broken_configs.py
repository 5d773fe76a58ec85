"""Broken configs (issue 10, items 2 and 3): each gives its one documented line, exit 2,
from both `config check` and `run`, with no traceback.

The real CLI in a subprocess. Certificates are made with trustme and cryptography;
"unreadable" really is unreadable for root: the command runs without CAP_DAC_OVERRIDE
and CAP_DAC_READ_SEARCH (setpriv), and "unwritable" is a read-only tmpfs mounted in a
private mount namespace (unshare -m), since root can write anywhere else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[2]
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search"]  # fmt: skip


@dataclass
class Files:
    """Everything a test config may point at, made once per test module."""

    dir: Path
    ca_pem: Path
    ca_der: Path
    junk: Path
    cert: Path  # a leaf certificate chain (PEM) ...
    key: Path  # ... and its key
    cert_der: Path
    other_key: Path  # a key of another certificate
    encrypted_key: Path
    opcua_cert: Path  # an application instance certificate (DER) with its URI ...
    opcua_key: Path  # ... and its key
    token: Path
    empty: Path
    unreadable: Path
    a_dir: Path
    a_file: Path
    ro_dir: Path  # mounted read-only (tmpfs) for the commands that need it


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("broken")
    ca = trustme.CA()
    leaf = ca.issue_cert("gw.example", "127.0.0.1")
    other = ca.issue_cert("other.example")
    ca.cert_pem.write_to_path(d / "ca.pem")
    (d / "ca.der").write_bytes(ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode()))
    (d / "junk.pem").write_text("this is not a certificate\n")
    leaf.cert_chain_pems[0].write_to_path(d / "cert.pem")
    leaf.private_key_pem.write_to_path(d / "key.pem")
    (d / "cert.der").write_bytes(ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode()))
    other.private_key_pem.write_to_path(d / "other-key.pem")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    (d / "encrypted-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    from adapters.sources.opcua import security

    security.generate_application_certificate(
        d / "opcua-cert.der", d / "opcua-key.pem", application_uri="urn:test:edge-agent"
    )
    (d / "token").write_text("s3cret-token\n")
    (d / "empty").write_text("\n")
    (d / "unreadable").write_text("s3cret\n")
    (d / "unreadable").chmod(0)
    (d / "a-dir").mkdir()
    (d / "a-file").write_text("a regular file\n")
    (d / "ro").mkdir()
    return Files(
        d, d / "ca.pem", d / "ca.der", d / "junk.pem", d / "cert.pem", d / "key.pem",
        d / "cert.der", d / "other-key.pem", d / "encrypted-key.pem", d / "opcua-cert.der",
        d / "opcua-key.pem", d / "token", d / "empty",
        d / "unreadable", d / "a-dir", d / "a-file", d / "ro",
    )  # fmt: skip


def base(
    tmp: Path,
    *,
    agent: str = 'plant = "p1"\nid = "a1"',
    buffer: str | None = None,
    metrics: str = "enabled = false",
    sink: str = 'type = "https"\nurl = "https://127.0.0.1:9/v1/batches"',
    extra: str = "",
    top: str = "",
) -> str:
    buffer = buffer if buffer is not None else f'path = "{tmp}/state/buffer.db"'
    return (
        f"{top}[agent]\n{agent}\n[buffer]\n{buffer}\n[metrics]\n{metrics}\n"
        f"[sinks.central]\n{sink}\n{extra}"
    )


def https(**keys: str) -> str:
    lines = ['type = "https"', 'url = "https://127.0.0.1:9/v1/batches"']
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(lines)


def mqtt_sink(**keys: str) -> str:
    lines = ['type = "mqtt"', 'url = "mqtts://127.0.0.1:8883"']
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(lines)


def nats(**keys: str) -> str:
    lines = ['type = "nats"', 'url = "tls://127.0.0.1:4222"']
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(lines)


def sparkplug(**keys: str) -> str:
    lines = ["[sources.spb]", 'type = "sparkplug"', 'url = "mqtt://127.0.0.1:1883"']
    lines += ['groups = ["Plant1"]', 'host_id = "edge-host"']
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def mes(listen: str = "127.0.0.1:0", **keys: str) -> str:
    lines = ["[sources.mes]", 'type = "mes_http"', f'listen = "{listen}"']
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def opcua(**keys: str) -> str:
    lines = ["[sources.line1]", 'type = "opcua"', 'endpoint = "opc.tcp://127.0.0.1:4840"']
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    lines += ["[[sources.line1.nodes]]", 'node_id = "ns=2;s=Line1.Counter"']
    return "\n".join(lines) + "\n"


def drop(path: Path | str, **keys: str) -> str:
    lines = ["[sources.drop]", 'type = "drop_folder"', f'path = "{path}"']
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Case:
    name: str
    #: the config text, from the shared files, this case's directory and a busy port
    config: Callable[[Files, Path, int], str]
    #: the documented line: "config error: KEY: ..." containing this text
    key: str
    says: str
    #: a prefix for the command (no DAC override; a read-only tmpfs)
    wrap: str = ""


CASES = [
    # ------------------------------------------------------------------ shape of the file
    Case("not TOML", lambda f, t, p: "[agent\nplant = 1\n", "", "not valid TOML"),
    Case(
        "type: int expected",
        lambda f, t, p: base(t, extra='[forwarder]\nmax_events = "many"\n'),
        "forwarder.max_events",
        "valid integer",
    ),
    Case(
        "type: bool expected",
        lambda f, t, p: base(t, metrics='enabled = "yes please"'),
        "metrics.enabled",
        "valid boolean",
    ),
    Case(
        "bad duration",
        lambda f, t, p: base(t, extra='[forwarder]\nbackoff_max = "soon"\n'),
        "forwarder.backoff_max",
        "'soon' is not a duration (use e.g. 250ms, 30s, 5m, 12h, 7d)",
    ),
    Case(
        "bad size",
        lambda f, t, p: base(t, buffer=f'path = "{t}/b.db"\nmax_bytes = "lots"'),
        "buffer.max_bytes",
        "'lots' is not a size",
    ),
    Case(
        "unknown key in a core section",
        lambda f, t, p: base(t, buffer=f'pth = "{t}/b.db"'),
        "buffer.pth",
        "unknown key (check the spelling",
    ),
    Case(
        "unknown key in a sink",
        lambda f, t, p: base(t, sink=https() + '\nurll = "x"'),
        "sinks.central.urll",
        "unknown key",
    ),
    Case(
        "required key missing",
        lambda f, t, p: base(t, sink='type = "https"'),
        "sinks.central.url",
        "required key is missing",
    ),
    Case(
        "unknown sink type",
        lambda f, t, p: base(t, sink='type = "ftp"'),
        "sinks.central.type",
        "unknown sink type 'ftp'",
    ),
    Case(
        "pattern in words",
        lambda f, t, p: base(t, agent='plant = "plant berlin/1"'),
        "agent.plant",
        "letters, digits, '.', '-' and '_' only, starting with a letter or digit "
        '(got "plant berlin/1")',
    ),
    Case(
        "unset environment variable",
        lambda f, t, p: base(t, sink=https() + '\ntoken = "${EDGE_TEST_UNSET_TOKEN}"'),
        "sinks.central.token",
        "environment variable EDGE_TEST_UNSET_TOKEN is not set",
    ),
    Case(
        "stream to a sink that is not there",
        lambda f, t, p: base(t, extra='[streams.quality]\nsink = "nowhere"\n'),
        "streams.quality.sink",
        "no sink named 'nowhere'",
    ),
    # ------------------------------------------------------------------ files
    Case(
        "ca_file missing",
        lambda f, t, p: base(t, sink=https(ca_file=f"{t}/nope.pem")),
        "sinks.central.ca_file",
        "no such file",
    ),
    Case(
        "ca_file is a directory",
        lambda f, t, p: base(t, sink=https(ca_file=str(f.a_dir))),
        "sinks.central.ca_file",
        "is a directory, not a file",
    ),
    Case(
        "ca_file in DER",
        lambda f, t, p: base(t, sink=https(ca_file=str(f.ca_der))),
        "sinks.central.ca_file",
        "is a DER certificate; edge-agent needs PEM: convert it with `openssl x509 -inform der -in ",
    ),
    Case(
        "ca_file junk",
        lambda f, t, p: base(t, sink=https(ca_file=str(f.junk))),
        "sinks.central.ca_file",
        "holds no PEM certificate",
    ),
    Case(
        "ca_file holds a key",
        lambda f, t, p: base(t, sink=https(ca_file=str(f.key))),
        "sinks.central.ca_file",
        "holds a private key, not a certificate",
    ),
    Case(
        "client key of another certificate",
        lambda f, t, p: base(t, sink=https(cert_file=str(f.cert), key_file=str(f.other_key))),
        "sinks.central.key_file",
        "does not match the certificate in",
    ),
    Case(
        "client certificate in DER",
        lambda f, t, p: base(t, sink=https(cert_file=str(f.cert_der), key_file=str(f.key))),
        "sinks.central.cert_file",
        "is a DER certificate",
    ),
    Case(
        "client key with a passphrase",
        lambda f, t, p: base(t, sink=https(cert_file=str(f.cert), key_file=str(f.encrypted_key))),
        "sinks.central.key_file",
        "is encrypted with a passphrase",
    ),
    Case(
        "token_file empty",
        lambda f, t, p: base(t, sink=https(token_file=str(f.empty))),
        "sinks.central.token_file",
        "is empty (write the secret into it)",
    ),
    Case(
        "token_file unreadable",
        lambda f, t, p: base(t, sink=https(token_file=str(f.unreadable))),
        "sinks.central.token_file",
        "permission denied",
        wrap="nodac",
    ),
    Case(
        "mqtt ca_file in DER",
        lambda f, t, p: base(t, sink=mqtt_sink(ca_file=str(f.ca_der))),
        "sinks.central.ca_file",
        "is a DER certificate",
    ),
    Case(
        "mqtt password_file missing",
        lambda f, t, p: base(t, sink=mqtt_sink(username="agent", password_file=f"{t}/nope")),
        "sinks.central.password_file",
        "no such file",
    ),
    Case(
        "mes_http tls key of another certificate",
        lambda f, t, p: base(t, extra=mes(tls_cert=str(f.cert), tls_key=str(f.other_key))),
        "sources.mes.tls_key",
        "does not match the certificate in",
    ),
    Case(
        "mes_http token_file empty",
        lambda f, t, p: base(t, extra=mes(token_file=str(f.empty))),
        "sources.mes.token_file",
        "is empty",
    ),
    Case(
        "opcua certificate junk",
        lambda f, t, p: base(t, extra=opcua(certificate=str(f.junk), private_key=str(f.key))),
        "sources.line1.certificate",
        "holds no PEM certificate",
    ),
    Case(
        "opcua certificate without ApplicationUri",
        lambda f, t, p: base(t, extra=opcua(certificate=str(f.cert_der), private_key=str(f.key))),
        "sources.line1.certificate",
        "has no ApplicationUri in its SubjectAltName",
    ),
    Case(
        "opcua key of another certificate",
        lambda f, t, p: base(
            t, extra=opcua(certificate=str(f.cert_der), private_key=str(f.other_key))
        ),
        "sources.line1.private_key",
        "does not match the certificate in",
    ),
    Case(
        "opcua password_file unreadable",
        lambda f, t, p: base(t, extra=opcua(username="op", password_file=str(f.unreadable))),
        "sources.line1.password_file",
        "permission denied",
        wrap="nodac",
    ),
    # ------------------------------------------------------------------ ports
    Case(
        "metrics port in use",
        lambda f, t, p: base(t, metrics=f'listen = "127.0.0.1:{p}"'),
        "metrics.listen",
        "is in use by another process",
    ),
    Case(
        "mes_http port in use",
        lambda f, t, p: base(t, extra=mes(f"127.0.0.1:{p}")),
        "sources.mes.listen",
        "is in use by another process",
    ),
    Case(
        "mes_http address not on this host",
        lambda f, t, p: base(t, extra=mes("192.0.2.1:8080", token_file=str(f.token))),
        "sources.mes.listen",
        "192.0.2.1 is not an address of this host",
    ),
    # ------------------------------------------------------------------ paths
    Case(
        "buffer under a regular file",
        lambda f, t, p: base(t, buffer=f'path = "{f.a_file}/sub/buffer.db"'),
        "buffer.path",
        "is a file, not a directory",
    ),
    Case(
        "buffer is a directory",
        lambda f, t, p: base(t, buffer=f'path = "{f.a_dir}"'),
        "buffer.path",
        "is a directory (name a file",
    ),
    Case(
        "buffer on a read-only filesystem",
        lambda f, t, p: base(t, buffer=f'path = "{f.ro_dir}/state/buffer.db"'),
        "buffer.path",
        "is not writable (Read-only file system)",
        wrap="ro",
    ),
    Case(
        "buffer is another application's database",
        lambda f, t, p: base(t, buffer=f'path = "{foreign_db(t)}"'),
        "buffer.path",
        "is an SQLite database but not an edge-agent buffer",
    ),
    Case(
        "buffer of a newer schema",
        lambda f, t, p: base(t, buffer=f'path = "{newer_buffer(t)}"'),
        "buffer.path",
        "has buffer schema 99, newer than this agent's",
    ),
    Case(
        "drop folder missing",
        lambda f, t, p: base(t, extra=drop(f"{t}/inbox")),
        "sources.drop.path",
        "no such directory",
    ),
    Case(
        "drop folder is a file",
        lambda f, t, p: base(t, extra=drop(f.a_file)),
        "sources.drop.path",
        "is not a directory",
    ),
    Case(
        "drop folder read-only",
        lambda f, t, p: base(t, extra=drop(f.ro_dir)),
        "sources.drop.path",
        "Read-only file system",
        wrap="ro",
    ),
    # ------------------------------------------------------------------ later adapters
    Case(
        "nats ca_file in DER",
        lambda f, t, p: base(t, sink=nats(ca_file=str(f.ca_der))),
        "sinks.central.ca_file",
        "is a DER certificate",
    ),
    Case(
        "nats token_file empty",
        lambda f, t, p: base(t, sink=nats(token_file=str(f.empty))),
        "sinks.central.token_file",
        "is empty",
    ),
    Case(
        "sparkplug password_file empty",
        lambda f, t, p: base(t, extra=sparkplug(username="u", password_file=str(f.empty))),
        "sources.spb.password_file",
        "is empty",
    ),
]


def junk_in(tmp: Path) -> Path:
    (tmp / "junk.db").write_text("not a database, but someone's file\n")
    return tmp / "junk.db"


def foreign_db(tmp: Path) -> Path:
    path = tmp / "inventory.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE parts (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    return path


def newer_buffer(tmp: Path) -> Path:
    path = tmp / "newer.db"
    if not path.exists():
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            conn.execute("PRAGMA user_version = 99")
        conn.close()
    return path


def command(files: Files, wrap: str, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "agent", *args]
    if wrap == "nodac":
        return [*NO_DAC, *cmd]
    if wrap == "ro":
        mount = f'mount -t tmpfs -o ro tmpfs {files.ro_dir} && exec "$@"'
        return ["unshare", "-m", "sh", "-c", mount, "sh", *cmd]
    return cmd


def cli(files: Files, wrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_TEST_")}
    return subprocess.run(
        command(files, wrap, *args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def test_the_case_list_is_long_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_config_is_one_line_and_exit_2_from_check_and_run(
    case: Case, files: Files, tmp_path: Path
) -> None:
    for tool, pkg in (("setpriv", "util-linux"), ("unshare", "util-linux")):
        assert shutil.which(tool), f"{tool} missing: apt-get install -y {pkg}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "agent.toml"
        cfg.write_text(case.config(files, tmp_path, port))
        with ThreadPoolExecutor(2) as pool:
            check_f = pool.submit(cli, files, case.wrap, "config", "check", str(cfg))
            run_f = pool.submit(cli, files, case.wrap, "run", "-c", str(cfg))
            check, run = check_f.result(), run_f.result()
    prefix = f"config error: {case.key}: " if case.key else "config error: "
    for what, res in (("config check", check), ("run", run)):
        out = res.stdout + res.stderr
        assert res.returncode == 2, (what, res.returncode, out)
        assert "Traceback" not in out, (what, out)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (what, lines)
        assert lines[0].startswith(prefix) and case.says in lines[0], (what, lines[0])
    assert check.stderr == run.stderr, "run says what config check says"
    assert not (tmp_path / "state").exists(), "nothing was created: check and run start nothing"


# ---------------------------------------------------------------------------- beyond one line


def test_every_problem_is_listed_in_the_files_order(files: Files, tmp_path: Path) -> None:
    text = (
        f'[sources.drop]\ntype = "drop_folder"\npath = "{tmp_path}/inbox"\n'
        + base(tmp_path, sink=https(ca_file=str(files.ca_der), token_file=str(files.empty)))
        + mes(tls_cert=str(files.cert), tls_key=str(files.other_key))
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    res = cli(files, "", "config", "check", str(cfg))
    assert res.returncode == 2, res
    keys = [line.split(": ")[1] for line in res.stderr.splitlines()]
    assert keys == [
        "sources.drop.path",
        "sinks.central.ca_file",
        "sinks.central.token_file",
        "sources.mes.tls_key",
    ], res.stderr
    as_json = cli(files, "", "config", "check", "--json", str(cfg))
    assert as_json.returncode == 2
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is False and [p["key"] for p in doc["problems"]] == keys
    assert all("Traceback" not in r.stdout + r.stderr for r in (res, as_json))


def test_a_config_whose_files_are_all_good_is_ok(files: Files, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    text = base(
        tmp_path,
        sink=https(
            ca_file=str(files.ca_pem), cert_file=str(files.cert), key_file=str(files.key),
            token_file=str(files.token),
        ),
        extra=mes(tls_cert=str(files.cert), tls_key=str(files.key), token_file=str(files.token))
        + drop(inbox)
        + opcua(certificate=str(files.opcua_cert), private_key=str(files.opcua_key)),
    )  # fmt: skip
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    res = cli(files, "", "config", "check", str(cfg))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{cfg}: ok (3 source(s): mes, drop, line1; 1 sink(s)"), res.stdout
    doc = json.loads(cli(files, "", "config", "check", "--json", str(cfg)).stdout)
    assert doc == {"file": str(cfg), "ok": True, "problems": [], "notes": [], "warnings": []}
    assert not (tmp_path / "state").exists(), "the check created nothing"


def test_ports_held_by_this_configs_running_agent_are_a_note_not_a_problem(
    files: Files, tmp_path: Path, agent_process
) -> None:
    from tests.fixtures.common import free_port

    metrics, listen = free_port(), free_port()
    config = {
        "agent": {"id": "a1", "plant": "p1"},
        "buffer": {"path": str(tmp_path / "buffer.db")},
        "metrics": {"enabled": True, "listen": f"127.0.0.1:{metrics}"},
        "sinks": {"central": {"type": "https", "url": "http://127.0.0.1:9/v1/batches"}},
        "sources": {"mes": {"type": "mes_http", "listen": f"127.0.0.1:{listen}"}},
    }
    agent = agent_process(config).start()
    agent.wait(lambda s: any(x["state"] == "connected" for x in s["sources"]), 60, "mes listening")
    res = cli(files, "", "config", "check", str(agent.config_path))
    assert res.returncode == 0, res.stderr
    pid = agent.proc.pid
    assert f"note: metrics.listen: 127.0.0.1:{metrics} is held by this config's running agent " \
           f"(pid {pid})" in res.stdout, res.stdout  # fmt: skip
    assert f"note: sources.mes.listen: 127.0.0.1:{listen} is held by this config's running " \
           f"agent (pid {pid})" in res.stdout, res.stdout  # fmt: skip
    # a second agent on the same buffer is refused (exit 1: nothing in the config is wrong)
    second = cli(files, "", "run", "-c", str(agent.config_path))
    assert second.returncode == 1, second
    assert second.stderr.strip() == (
        f"Error: an agent is already running with buffer {tmp_path / 'buffer.db'} (pid {pid}): "
        "stop it first (systemctl stop edge-agent), or reload it with SIGHUP"
    )
    assert agent.stop() == 0
    # another process on the port once the agent is gone: a problem again
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", metrics))
        other.listen()
        res = cli(files, "", "config", "check", str(agent.config_path))
    assert res.returncode == 2
    assert f"config error: metrics.listen: 127.0.0.1:{metrics} is in use by another process" in (
        res.stderr
    )


def test_an_unused_config_key_file_is_not_opened(files: Files, tmp_path: Path) -> None:
    """A disabled source is not started by run, so its files are not checked either."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(base(tmp_path, extra=drop(f"{tmp_path}/inbox") + "enabled = false\n"))
    res = cli(files, "", "config", "check", str(cfg))
    assert res.returncode == 0, res.stderr


def test_pem_key_is_recognised_by_type(files: Files, tmp_path: Path) -> None:
    """An EC key works like an RSA key (trustme makes RSA or EC depending on version)."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text(base(tmp_path, sink=https(cert_file=str(files.cert), key_file=str(path))))
    res = cli(files, "", "config", "check", str(cfg))
    assert res.returncode == 2
    assert res.stderr.startswith("config error: sinks.central.key_file: ")
    assert "does not match the certificate in" in res.stderr


def test_a_damaged_buffer_is_reported_by_check_and_left_to_runs_quarantine(
    files: Files, tmp_path: Path
) -> None:
    """`run` moves a damaged buffer aside (tests/faults/test_start_faults.py); `config check`
    says beforehand that it will, and changes nothing."""
    junk = junk_in(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(base(tmp_path, buffer=f'path = "{junk}"'))
    res = cli(files, "", "config", "check", str(cfg))
    assert res.returncode == 2, res
    assert res.stderr == (
        f"config error: buffer.path: {junk} is not a readable SQLite buffer (damaged, or another "
        "kind of file): run will move it aside to junk.db.corrupt-TIMESTAMP, say so and stop; the "
        "next start begins a new buffer (recover events from the old file with: sqlite3 FILE "
        ".recover)\n"
    )
    assert junk.read_text() == "not a database, but someone's file\n"
    assert sorted(tmp_path.iterdir()) == sorted([junk, cfg]), "nothing moved, nothing made"


def test_reload_makes_the_same_checks_and_its_own_ports_are_no_problem(
    files: Files, tmp_path: Path, agent_process
) -> None:
    """SIGHUP with a config naming a DER CA file is refused with config check's line; a
    reload that keeps the agent's own metrics and MES ports is applied."""
    import signal
    import time

    from tests.fixtures.common import free_port

    metrics, listen = free_port(), free_port()
    config = {
        "agent": {"id": "a1", "plant": "p1"},
        "buffer": {"path": str(tmp_path / "buffer.db")},
        "metrics": {"enabled": True, "listen": f"127.0.0.1:{metrics}"},
        "sinks": {"central": {"type": "https", "url": "https://127.0.0.1:9/v1/batches"}},
        "sources": {"mes": {"type": "mes_http", "listen": f"127.0.0.1:{listen}"}},
    }
    agent = agent_process(config).start()
    agent.wait(lambda s: any(x["state"] == "connected" for x in s["sources"]), 60, "listening")

    def lines(needle: str, count: int) -> list[str]:
        deadline = time.monotonic() + 60
        while True:
            found = [line for line in agent.log().splitlines() if needle in line]
            if len(found) >= count:
                return found
            assert agent.proc.poll() is None, agent.log()[-3000:]
            assert time.monotonic() < deadline, agent.log()[-3000:]
            time.sleep(0.2)

    bad = {**config["sinks"]["central"], "ca_file": str(files.ca_der)}
    agent.write_config({**config, "sinks": {"central": bad}})
    agent.signal(signal.SIGHUP)
    [refused] = lines("reload refused", 1)
    msg = json.loads(refused)["msg"]
    assert msg.startswith(
        "reload refused, the running config is kept: sinks.central.ca_file: "
        f"{files.ca_der} is a DER certificate; edge-agent needs PEM: convert it with "
        f"`openssl x509 -inform der -in {files.ca_der} -out "
    ), msg
    agent.write_config({**config, "forwarder": {"max_events": 500}})
    agent.signal(signal.SIGHUP)
    lines("reloading: restarting sources, sinks and forwarders", 1)
    assert len(lines("reload refused", 1)) == 1, "the good reload was not refused"
    assert agent.stop() == 0
