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

import agent
from tests.packaging.helpers import REPO, require_tool

# Lintian tags that are deliberate, with the reason.
LINTIAN_ACCEPTED = {
    # the PyInstaller bootloader is not built as PIE
    "hardening-no-pie",
    # no debhelper: the scripts call systemctl guarded by [ -d /run/systemd/system ]
    "maintainer-script-calls-systemctl",
    # `edge-agent --help` and /usr/share/doc/edge-agent/install.md document it
    "no-manual-page",
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
    listing = {}
    for line in dpkg_deb("-c", str(edge_agent_deb)).splitlines():
        perms, owner, _size, _date, _time, name = line.split(None, 5)
        listing[name.removeprefix(".")] = (perms, owner)
    assert listing["/usr/bin/edge-agent"] == ("-rwxr-xr-x", "root/root")
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
    assert re.search(r"(?m)^ Depends: libc6 \(>= [0-9.]+\), adduser$", info)
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
st() { stat -c "$1 %a %U:%G" "$2"; }
echo "== install"
dpkg -i /pkg/edge-agent.deb
getent passwd edge-agent | cut -d: -f1,6,7 | sed 's/^/passwd /'
st state /var/lib/edge-agent
st logs /var/log/edge-agent
st confdir /etc/edge-agent
st conf /etc/edge-agent/edge-agent.toml
[ -e /etc/systemd/system/multi-user.target.wants/edge-agent.service ] && echo enabled=yes || echo enabled=no
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
# until its first heartbeat (a one-file binary unpacks itself first: seconds on a slow disk)
runuser -u edge-agent -- sh -c 'umask 0077
/usr/bin/edge-agent run -c /etc/edge-agent/edge-agent.toml & p=$!
i=0
while [ ! -e /var/lib/edge-agent/buffer.db.heartbeat ] && [ $i -lt 600 ] && kill -0 $p; do
  sleep 0.1; i=$((i+1))
done
sleep 1
kill -TERM $p; wait $p' >/root/run.log 2>&1 || true
cd /
/usr/bin/edge-agent status -c /etc/edge-agent/edge-agent.toml >/dev/null; [ $? -eq 3 ] && echo root-status=ok
find /var/lib/edge-agent -mindepth 1 -exec stat -c "file %n %a %U:%G %F" {} +
runuser -u nobody -- cat /var/lib/edge-agent/buffer.db >/dev/null 2>&1 && echo other-can-read-buffer=yes || echo other-can-read-buffer=no
cp /root/packaged.toml /etc/edge-agent/edge-agent.toml
echo "== reinstall"
dpkg -i /pkg/edge-agent.deb >/dev/null
st state /var/lib/edge-agent
echo "== remove"
dpkg -r edge-agent >/dev/null
[ -e /usr/bin/edge-agent ] && echo binary=yes || echo binary=no
[ -e /var/lib/edge-agent/buffer.db ] && echo buffer=yes || echo buffer=no
[ -e /etc/edge-agent/edge-agent.toml ] && echo conf=yes || echo conf=no
getent passwd edge-agent >/dev/null && echo user=yes || echo user=no
echo "== purge"
dpkg -P edge-agent </dev/null
[ -e /var/lib/edge-agent ] && echo state=yes || echo state=no
[ -e /etc/edge-agent ] && echo confdir=yes || echo confdir=no
getent passwd edge-agent >/dev/null && echo user=yes || echo user=no
getent group edge-agent >/dev/null && echo group=yes || echo group=no
"""


def in_throwaway_root(tmp_path: Path, deb: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as root in a chroot onto a copy-on-write overlay of the host's /."""
    assert os.geteuid() == 0, "the install test needs root (it runs dpkg in an overlay chroot)"
    require_tool("unshare", "apt-get install util-linux")
    upper, work, merged, pkg = (tmp_path / n for n in ("upper", "work", "merged", "pkg"))
    for d in (upper, work, merged, pkg):
        d.mkdir()
    shutil.copyfile(deb, pkg / "edge-agent.deb")
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
        timeout=300,
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


def test_install_remove_purge(edge_agent_deb: Path, tmp_path: Path) -> None:
    host_before = _host_state()
    with socket.socket() as sock:  # nothing listens: the agent buffers
        sock.bind(("127.0.0.1", 0))
        script = INSTALL_SCRIPT.replace("@SINK_PORT@", str(sock.getsockname()[1]))
    res = in_throwaway_root(tmp_path, edge_agent_deb, script)
    assert _host_state() == host_before, "the install test leaked into the host"
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    install, rest = out.split("== run")
    ran, rest = rest.split("== reinstall")
    reinstall, rest = rest.split("== remove")
    remove, purge = rest.split("== purge")
    assert "passwd edge-agent:/var/lib/edge-agent:/usr/sbin/nologin" in install
    assert "state 700 edge-agent:edge-agent" in install
    assert "logs 750 edge-agent:edge-agent" in install
    assert "confdir 750 root:edge-agent" in install
    assert "conf 640 root:edge-agent" in install
    assert "enabled=no" in install  # not started before it is configured
    assert "user-can-read-config=yes" in install
    # the buffer the agent created, and everything else it wrote, is its own and private;
    # root's `edge-agent status` (read-only) left no root-owned file behind
    assert "root-status=ok" in ran, ran
    files = [line.split() for line in ran.splitlines() if line.startswith("file ")]
    assert any(f[1] == "/var/lib/edge-agent/buffer.db" for f in files), ran
    for _, name, mode, owner, *kind in files:
        assert owner == "edge-agent:edge-agent", f"{name} is owned by {owner}"
        # buffer and heartbeat 0640: the edge-agent group may run `edge-agent status`
        assert mode == ("700" if kind == ["directory"] else "640"), f"{name} has mode {mode}"
    assert "other-can-read-buffer=no" in ran
    assert "systemctl enable --now edge-agent" in install  # tells the admin what is next
    assert "state 700 edge-agent:edge-agent" in reinstall
    assert remove.split() == ["binary=no", "buffer=yes", "conf=yes", "user=yes"]
    assert purge.split()[-4:] == ["state=no", "confdir=no", "user=no", "group=no"]
