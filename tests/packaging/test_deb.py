"""The .deb: contents, metadata, lintian, and a real install/remove/purge.

The install test runs dpkg in a throwaway root: an overlay of the host's / in a private
mount namespace, so the host (its users, /usr/bin, dpkg database) is never touched. It
needs root and mount namespaces (a CI container needs CAP_SYS_ADMIN, e.g. --privileged).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import click

import agent
from agent.cli import cli
from tests.fixtures.packaging import REPO, require_tool

# Lintian tags that are deliberate, with the reason.
LINTIAN_ACCEPTED = {
    # the PyInstaller bootloader is not built as PIE
    "hardening-no-pie",
    # no debhelper: the scripts call systemctl (daemon-reload) guarded by
    # [ -d /run/systemd/system ], exactly as dh_installsystemd's snippets do
    "maintainer-script-calls-systemctl",
    # /usr/lib/edge-agent is a PyInstaller bundle of CPython: its extension modules resolve
    # Python's symbols from the interpreter, not by linking libpython ...
    "shared-library-lacks-prerequisites",
    # ... and some use nothing from libc (_statistics, _uuid)
    "library-not-linked-against-libc",
    # a CPython built with its own expat (pyenv, python.org) carries it in pyexpat; Debian's
    # python3 links the system's libexpat instead (build releases with it)
    "embedded-library",
    # the config may hold secrets: root:edge-agent 0750 / 0640
    "non-standard-dir-perm",
    "non-standard-file-perm",
}


def dpkg_deb(*args: str) -> str:
    require_tool("dpkg-deb", "apt-get install dpkg-dev")
    return subprocess.run(
        ["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def test_contents(edge_agent_deb: Path) -> None:
    listing, links = {}, {}
    for line in dpkg_deb("-c", str(edge_agent_deb)).splitlines():
        perms, owner, _size, _date, _time, name = line.split(None, 5)
        name, _, target = name.partition(" -> ")
        listing[name.removeprefix(".")] = (perms, owner)
        if target:
            links[name.removeprefix(".")] = target
    # the one-folder build, and the command linking to it
    assert listing["/usr/lib/edge-agent/edge-agent"] == ("-rwxr-xr-x", "root/root")
    assert any(n.startswith("/usr/lib/edge-agent/_internal/libpython") for n in listing)
    # no copy of OpenSSL: the system's libssl3 (and its security updates) serves
    assert not [n for n in listing if re.search(r"/lib(ssl|crypto)\.so", n)]
    assert listing["/usr/bin/edge-agent"][0].startswith("l")
    assert links["/usr/bin/edge-agent"] == "../lib/edge-agent/edge-agent"
    assert not [n for n, (perms, owner) in listing.items() if owner != "root/root"]
    assert listing["/usr/share/man/man1/edge-agent.1.gz"] == ("-rw-r--r--", "root/root")
    # every adapter's sample, as <kind>-<type>.toml
    samples = sorted(REPO.glob("adapters/*/*/sample.toml"))
    assert samples
    for sample in samples:
        kind, type_ = sample.parts[-3], sample.parts[-2]
        example = f"/usr/share/doc/edge-agent/examples/{kind}-{type_}.toml"
        assert listing.get(example) == ("-rw-r--r--", "root/root"), f"{example} missing"
    assert listing["/lib/systemd/system/edge-agent.service"] == ("-rw-r--r--", "root/root")
    assert listing["/etc/edge-agent/edge-agent.toml"] == ("-rw-r-----", "root/root")
    assert listing["/etc/edge-agent/"][0] == "drwxr-x---"
    for doc in ("copyright", "changelog.gz", "install.md", "alerts.md", "prometheus-rules.yml"):
        assert f"/usr/share/doc/edge-agent/{doc}" in listing, f"{doc} missing from the .deb"
    # nothing from the build tree or the checkout leaks in
    assert not [n for n in listing if re.search(r"\.pyc$|/tests?/|\.venv|__pycache__", n)]


def test_control_and_conffiles(edge_agent_deb: Path, tmp_path: Path) -> None:
    info = dpkg_deb("-I", str(edge_agent_deb))
    assert re.search(r"(?m)^ Package: edge-agent$", info)
    assert re.search(rf"(?m)^ Version: {re.escape(agent.__version__)}$", info)
    (depends,) = re.findall(r"(?m)^ Depends: (.*)$", info)
    assert re.fullmatch(
        r"libc6 \(>= [0-9.]+\), (.+), adduser, init-system-helpers \(>= 1\.54~\)", depends
    ), depends
    # the system's OpenSSL (and zlib, sqlite, ...) instead of copies in the bundle
    assert re.search(r"\blibssl3 \(>= 3\.[0-9.]+\)", depends), depends
    for script in ("postinst", "prerm", "postrm", "conffiles", "md5sums"):
        assert re.search(rf"(?m)^ +\d+ bytes, +\d+ lines +\*? +{script}\b", info), script
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(edge_agent_deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/edge-agent/edge-agent.toml"]


def test_packaged_config_is_the_example_with_the_state_dir(
    edge_agent_deb: Path, tmp_path: Path
) -> None:
    subprocess.run(["dpkg-deb", "-x", str(edge_agent_deb), str(tmp_path)], check=True)
    packaged = tomllib.loads((tmp_path / "etc/edge-agent/edge-agent.toml").read_text())
    example = tomllib.loads((REPO / "config/example.toml").read_text())
    assert packaged["buffer"]["path"] == "/var/lib/edge-agent/buffer.db"
    packaged["buffer"].pop("path")
    example.get("buffer", {}).pop("path", None)
    assert packaged == example
    res = subprocess.run(
        [str(tmp_path / "usr/bin/edge-agent"), "config", "check", "etc/edge-agent/edge-agent.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _commands(group: click.Group, prefix: str = "edge-agent") -> list[str]:
    ctx = click.Context(group)
    out = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is not None and not cmd.hidden:
            out.append(f"{prefix} {name}")
            if isinstance(cmd, click.Group):
                out += _commands(cmd, f"{prefix} {name}")
    return out


def test_man_page_is_the_cli_help(edge_agent_deb: Path, tmp_path: Path) -> None:
    """edge-agent(1) renders without a groff warning and has every command and option."""
    man = require_tool("man", "apt-get install man-db")
    subprocess.run(["dpkg-deb", "-x", str(edge_agent_deb), str(tmp_path)], check=True)
    page = tmp_path / "usr/share/man/man1/edge-agent.1.gz"
    res = subprocess.run(
        [man, "--warnings", "-E", "UTF-8", "-l", "-Tutf8", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "100", "LC_ALL": "C.UTF-8"},
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    text = re.sub(r".\x08", "", res.stdout)  # overstrike bold/underline
    assert re.search(r"(?m)^NAME\n\s+edge-agent - ", text), text[:500]
    commands = _commands(cli)
    assert "edge-agent config check" in commands and "edge-agent status" in commands
    for command in commands:
        assert command in text, f"{command} missing from edge-agent(1)"
    for option in ("--config", "--json", "--version", "--since"):
        assert option in text, f"{option} missing from edge-agent(1)"


def test_lintian(edge_agent_deb: Path) -> None:
    lintian = require_tool("lintian", "apt-get install lintian")
    res = subprocess.run(
        [lintian, "--tag-display-limit", "0", str(edge_agent_deb)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    tags = re.findall(r"(?m)^([EWX]): edge-agent[^:]*: (\S+)", res.stdout)
    unexpected = [f"{level}: {tag}" for level, tag in tags if tag not in LINTIAN_ACCEPTED]
    assert not unexpected, res.stdout
    assert tags or res.returncode == 0, res.stdout + res.stderr  # lintian itself worked


INSTALL_SCRIPT = r"""
set -e
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
st() { stat -c "$1 %a %U:%G" "$2"; }
WANTS=/etc/systemd/system/multi-user.target.wants/edge-agent.service
DSH=/var/lib/systemd/deb-systemd-helper-enabled/edge-agent.service.dsh-also
units() {
  [ -e $WANTS ] && echo enabled=yes || echo enabled=no
  [ -L $WANTS ] && echo wants-link=yes || echo wants-link=no
  [ -f $DSH ] && echo dsh-state=yes || echo dsh-state=no
  [ "$(readlink /etc/systemd/system/edge-agent.service)" = /dev/null ] && echo masked=yes || echo masked=no
}
# systemctl as deb-systemd-invoke and the scripts see it: systemd is not PID 1 here, so
# /run/systemd/system says "booted with systemd" and a recorder stands in for systemctl:
# it logs every call, answers is-enabled with the real systemctl working offline on the
# files (--root=/), and is-active from /run/edge-agent.active (the test's "it is running").
# enable/disable below are the real systemctl --root=/, as offline as that.
mkdir -p /run/systemd/system
cat > /usr/local/sbin/systemctl <<'SHIM'
#!/bin/sh
echo "systemctl $*" >> /root/systemctl.log
case " $* " in
  *" is-enabled "*) exec /usr/bin/systemctl --root=/ is-enabled edge-agent.service ;;
  *" is-active "*) [ -e /run/edge-agent.active ]; exit $? ;;
esac
SHIM
chmod 0755 /usr/local/sbin/systemctl
# a container image's "no services" policy-rc.d (Docker's exits 101) is not a plant server's
rm -f /usr/sbin/policy-rc.d
calls() { [ -f /root/systemctl.log ] && sed 's/^/call /' /root/systemctl.log; rm -f /root/systemctl.log; }
echo "== install"
dpkg -i /pkg/edge-agent.deb
getent passwd edge-agent | cut -d: -f1,6,7 | sed 's/^/passwd /'
st state /var/lib/edge-agent
st logs /var/log/edge-agent
st confdir /etc/edge-agent
st conf /etc/edge-agent/edge-agent.toml
st lib /usr/lib/edge-agent/edge-agent
readlink /usr/bin/edge-agent | sed 's/^/symlink /'
units
calls
runuser -u edge-agent -- /usr/bin/edge-agent config check /etc/edge-agent/edge-agent.toml >/dev/null && echo user-can-read-config=yes
echo "== run"
# the agent as the unit runs it (user, umask, working dir), on a loopback test config
cp /etc/edge-agent/edge-agent.toml /root/packaged.toml
cat > /etc/edge-agent/edge-agent.toml <<CONF
[agent]
plant = "p1"
[buffer]
path = "/var/lib/edge-agent/buffer.db"
[metrics]
enabled = false
[sinks.central]
type = "https"
url = "http://127.0.0.1:@SINK_PORT@/v1/batches"
[sources.sim]
type = "simulator"
CONF
cd /var/lib/edge-agent
# until its first heartbeat; TMPDIR unwritable: the one-folder build unpacks nothing
mkdir -p /root/notmp && chmod 0500 /root/notmp
runuser -u edge-agent -- sh -c 'umask 0027
TMPDIR=/root/notmp /usr/bin/edge-agent run -c /etc/edge-agent/edge-agent.toml & p=$!
i=0
while [ ! -e /var/lib/edge-agent/buffer.db.heartbeat ] && [ $i -lt 600 ] && kill -0 $p; do
  sleep 0.1; i=$((i+1))
done
sleep 1
kill -TERM $p; wait $p' >/root/run.log 2>&1 || true
cd /
rc=0; /usr/bin/edge-agent status -c /etc/edge-agent/edge-agent.toml >/dev/null || rc=$?
[ $rc -eq 3 ] && echo root-status=ok  # the agent has stopped: "not running" is exit 3
find /var/lib/edge-agent -mindepth 1 -exec stat -c "file %n %a %U:%G %F" {} +
runuser -u nobody -- cat /var/lib/edge-agent/buffer.db >/dev/null 2>&1 && echo other-can-read-buffer=yes || echo other-can-read-buffer=no
useradd --no-create-home --shell /usr/sbin/nologin --groups edge-agent operator1
runuser -u operator1 -- cat /var/lib/edge-agent/buffer.db /var/lib/edge-agent/buffer.db.heartbeat >/dev/null && echo group-can-read-buffer=yes
cp /root/packaged.toml /etc/edge-agent/edge-agent.toml
echo "== reinstall"
dpkg -i /pkg/edge-agent.deb >/dev/null
st state /var/lib/edge-agent
calls
echo "== enable"
/usr/bin/systemctl --root=/ enable edge-agent.service 2>/dev/null
units
echo "== remove-enabled"
dpkg -r edge-agent >/dev/null
[ -e /usr/bin/edge-agent ] && echo binary=yes || echo binary=no
[ -e /usr/lib/edge-agent ] && echo libdir=yes || echo libdir=no
[ -e /var/lib/edge-agent/buffer.db ] && echo buffer=yes || echo buffer=no
[ -e /etc/edge-agent/edge-agent.toml ] && echo conf=yes || echo conf=no
getent passwd edge-agent >/dev/null && echo user=yes || echo user=no
units
calls
echo "== reinstall-enabled"
dpkg -i /pkg/edge-agent.deb >/dev/null
units
calls
echo "== upgrade"
touch /run/edge-agent.active
dpkg -i /pkg/edge-agent-next.deb >/dev/null
dpkg-query -W -f '${Version}\n' edge-agent | sed 's/^/version /'
units
calls
echo "== upgrade-policy-denied"
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
dpkg -i /pkg/edge-agent-next.deb >/dev/null 2>&1
rm /usr/sbin/policy-rc.d
calls
echo "== disable"
/usr/bin/systemctl --root=/ disable edge-agent.service 2>/dev/null
units
echo "== upgrade-disabled-running"
dpkg -i /pkg/edge-agent-next.deb >/dev/null
calls
echo "== upgrade-disabled-stopped"
rm /run/edge-agent.active
dpkg -i /pkg/edge-agent-next.deb >/dev/null
calls
echo "== remove-disabled"
dpkg -r edge-agent >/dev/null
units
calls
echo "== reinstall-disabled"
dpkg -i /pkg/edge-agent.deb >/dev/null
units
calls
echo "== purge"
dpkg -P edge-agent </dev/null
[ -e /var/lib/edge-agent ] && echo state=yes || echo state=no
[ -e /etc/edge-agent ] && echo confdir=yes || echo confdir=no
userdel operator1
getent passwd edge-agent >/dev/null && echo user=yes || echo user=no
getent group edge-agent >/dev/null && echo group=yes || echo group=no
units
"""


def in_throwaway_root(
    tmp_path: Path, debs: dict[str, Path], script: str
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as root in a chroot onto a copy-on-write overlay of the host's /, with
    ``debs`` (name -> .deb) in /pkg."""
    assert os.geteuid() == 0, "the install test needs root (it runs dpkg in an overlay chroot)"
    require_tool("unshare", "apt-get install util-linux")
    upper, work, merged, pkg = (tmp_path / n for n in ("upper", "work", "merged", "pkg"))
    for d in (upper, work, merged, pkg):
        d.mkdir()
    for name, deb in debs.items():
        shutil.copyfile(deb, pkg / name)
    setup = f"""
set -e
mount -t overlay overlay -o lowerdir=/,upperdir={upper},workdir={work} {merged}
mount --bind /proc {merged}/proc
mount --bind /dev {merged}/dev
mkdir -p {merged}/pkg
mount --bind {pkg} {merged}/pkg
exec chroot {merged} /bin/sh -c "$1"
"""
    res = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "sh",
            "-c",
            setup,
            "sh",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=1200,  # nine dpkg runs of a 40 MB package, man-db triggers: minutes when loaded
    )
    if "overlay" in res.stderr and res.returncode != 0 and "== install" not in res.stdout:
        raise AssertionError(
            "cannot build the throwaway root (needs root with mount namespaces and overlayfs; "
            f"in a container run it --privileged): {res.stderr}"
        )
    return res


def _host_state() -> tuple[bool, bool, bool]:
    user = subprocess.run(["getent", "passwd", "edge-agent"], capture_output=True).returncode == 0
    return user, Path("/usr/bin/edge-agent").exists(), Path("/var/lib/edge-agent").exists()


def _sections(out: str) -> dict[str, list[str]]:
    parts = re.split(r"(?m)^== (\S+)$", out)
    return {name: body.split("\n") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _units(lines: list[str]) -> dict[str, str]:
    keys = ("enabled", "wants-link", "dsh-state", "masked")
    return dict(line.split("=", 1) for line in lines if line.split("=", 1)[0] in keys)


def _calls(lines: list[str]) -> list[str]:
    return [line.removeprefix("call ") for line in lines if line.startswith("call ")]


def _actions(lines: list[str]) -> list[str]:
    """The service actions systemd was asked for (start, stop, restart...), not the queries."""
    queries = ("daemon-reload", "is-enabled", "is-active")
    return [c for c in _calls(lines) if not any(q in c.split() for q in queries)]


RESTART = "systemctl --quiet --system restart edge-agent.service"


def test_install_run_remove_reinstall_upgrade_purge(
    edge_agent_deb: Path, edge_agent_deb_next: Path, tmp_path: Path
) -> None:
    host_before = _host_state()
    with socket.socket() as sock:  # nothing listens: the agent buffers
        sock.bind(("127.0.0.1", 0))
        script = INSTALL_SCRIPT.replace("@SINK_PORT@", str(sock.getsockname()[1]))
    debs = {"edge-agent.deb": edge_agent_deb, "edge-agent-next.deb": edge_agent_deb_next}
    res = in_throwaway_root(tmp_path, debs, script)
    assert _host_state() == host_before, "the install test leaked into the host"
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    sec = _sections(out)
    install, ran = "\n".join(sec["install"]), "\n".join(sec["run"])

    # fresh install: user, group, directories; the service neither enabled nor started
    assert "passwd edge-agent:/var/lib/edge-agent:/usr/sbin/nologin" in install
    assert "state 750 edge-agent:edge-agent" in install
    assert "logs 750 edge-agent:edge-agent" in install
    assert "confdir 750 root:edge-agent" in install
    assert "conf 640 root:edge-agent" in install
    assert "lib 755 root:root" in install
    assert "symlink ../lib/edge-agent/edge-agent" in install
    assert _units(sec["install"]) == {
        "enabled": "no",
        "wants-link": "no",
        "dsh-state": "yes",  # deb-systemd-helper knows the unit: purge cleans up after it
        "masked": "no",
    }
    assert "systemctl --system daemon-reload" in _calls(sec["install"])
    assert _actions(sec["install"]) == []  # not started: it is not enabled
    assert "user-can-read-config=yes" in install
    assert "systemctl enable --now edge-agent" in install  # tells the admin what is next

    # the agent as the unit runs it, from the one-folder build (TMPDIR unusable: nothing
    # unpacked): its files are its own, the group may read them (`status`), others not
    assert "root-status=ok" in ran, ran
    files = [line.split() for line in sec["run"] if line.startswith("file ")]
    assert any(f[1] == "/var/lib/edge-agent/buffer.db" for f in files), ran
    assert any(f[1] == "/var/lib/edge-agent/buffer.db.heartbeat" for f in files), ran
    for _, name, mode, owner, *kind in files:
        assert owner == "edge-agent:edge-agent", f"{name} is owned by {owner}"
        assert mode == ("750" if kind == ["directory"] else "640"), f"{name} has mode {mode}"
    assert "other-can-read-buffer=no" in ran
    assert "group-can-read-buffer=yes" in ran

    assert "state 750 edge-agent:edge-agent" in sec["reinstall"]
    assert _actions(sec["reinstall"]) == []  # neither enabled nor running

    # enabled by the admin; `dpkg -r` stops it, keeps state, user and the enablement
    assert _units(sec["enable"])["enabled"] == "yes"
    removed = sec["remove-enabled"]
    assert [line for line in removed if line.split("=")[0] in ("binary", "libdir")] == [
        "binary=no",
        "libdir=no",
    ]
    assert {"buffer=yes", "conf=yes", "user=yes"} <= set(removed)
    assert _units(removed) == {
        "enabled": "no",  # the unit file is gone: the link dangles, masked meanwhile
        "wants-link": "yes",
        "dsh-state": "yes",
        "masked": "yes",
    }
    assert _actions(removed) == ["systemctl stop edge-agent.service"]
    # reinstalled: enabled again, unmasked, and started again: forwarding resumes
    assert _units(sec["reinstall-enabled"]) == {
        "enabled": "yes",
        "wants-link": "yes",
        "dsh-state": "yes",
        "masked": "no",
    }
    assert _actions(sec["reinstall-enabled"]) == [RESTART]

    # upgrade of the running service: still enabled, restarted once the new files are in
    # place, never stopped by the old prerm first
    assert f"version {agent.__version__}+next1" in sec["upgrade"]
    assert _units(sec["upgrade"])["enabled"] == "yes"
    assert _actions(sec["upgrade"]) == [RESTART]
    # ... through deb-systemd-invoke, so the admin's policy-rc.d can forbid it
    assert _actions(sec["upgrade-policy-denied"]) == []

    # disabled by the admin: an upgrade restarts it only while it runs; it stays disabled
    # (and stopped) across remove and reinstall
    assert _units(sec["disable"])["enabled"] == "no"
    assert _actions(sec["upgrade-disabled-running"]) == [RESTART]
    assert _actions(sec["upgrade-disabled-stopped"]) == []
    assert _units(sec["remove-disabled"])["wants-link"] == "no"
    assert _units(sec["reinstall-disabled"])["enabled"] == "no"
    assert _actions(sec["reinstall-disabled"]) == []

    purge = sec["purge"]
    assert {"state=no", "confdir=no", "user=no", "group=no"} <= set(purge), purge
    assert _units(purge) == {
        "enabled": "no",
        "wants-link": "no",
        "dsh-state": "no",
        "masked": "no",
    }
