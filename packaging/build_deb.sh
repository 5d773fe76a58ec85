#!/usr/bin/env bash
# Build dist/edge-agent_<version>_<arch>.deb from dist/edge-agent-onedir (build_binary.sh).
#
#   packaging/build_deb.sh                 # uses dist/edge-agent-onedir, builds it if missing
#   packaging/build_deb.sh --onedir DIR    # package an already built one-folder build
#   packaging/build_deb.sh --version V     # another package version (tests build upgrades)
#   packaging/build_deb.sh --config PATH   # another example config (default config/example.toml)
#   packaging/build_deb.sh --out DIR       # write the .deb (and its staging tree) to DIR
#
# Contents: the one-folder build in /usr/lib/edge-agent (nothing unpacked at start; the
# libraries the distribution ships, OpenSSL first, used from the system, not copied) and
# /usr/bin/edge-agent linking to it, /lib/systemd/system/edge-agent.service,
# /etc/edge-agent/edge-agent.toml (conffile, from config/example.toml with the buffer in
# /var/lib/edge-agent), docs in /usr/share/doc/edge-agent with every adapter's sample.toml
# in examples/, and edge-agent(1) written from the CLI's help (packaging/manpage.py).
# Maintainer scripts in packaging/deb/. Needs dpkg-deb and fakeroot (apt-get install
# dpkg-dev fakeroot patchelf) and, for the man page, a Python with the project's dependencies
# (PYTHON=..., else build/venv or .venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ONEDIR="$ROOT/dist/edge-agent-onedir"
VERSION=""
CONFIG="$ROOT/config/example.toml"
OUTDIR="$ROOT/dist"
STAGEDIR="$ROOT/build/deb"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --onedir) ONEDIR="$(realpath "$2")"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --config) CONFIG="$(realpath "$2")"; shift 2 ;;
    --out) OUTDIR="$(realpath -m "$2")"; STAGEDIR="$OUTDIR/stage"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "build_deb.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

for tool in dpkg-deb dpkg-architecture fakeroot strip patchelf; do
  command -v "$tool" >/dev/null || {
    echo "build_deb.sh: $tool not found (apt-get install dpkg-dev fakeroot binutils patchelf)" >&2
    exit 1; }
done
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/build/venv/bin/python" ]]; then PY="$ROOT/build/venv/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
[[ -x "$ONEDIR/edge-agent" ]] || "$ROOT/packaging/build_binary.sh" --use-current
[[ -x "$ONEDIR/edge-agent" && -d "$ONEDIR/_internal" ]] || {
  echo "build_deb.sh: $ONEDIR is not a one-folder build (edge-agent + _internal/)" >&2; exit 1; }
[[ -f "$CONFIG" ]] || {
  echo "build_deb.sh: $CONFIG is missing (it becomes /etc/edge-agent/edge-agent.toml)" >&2
  exit 1; }

[[ -n "$VERSION" ]] || VERSION="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
ARCH="$(dpkg --print-architecture)"
GLIBC="$(getconf GNU_LIBC_VERSION | awk '{print $2}')"
PKG="edge-agent_${VERSION}_${ARCH}"
MAINTAINER="${DEB_MAINTAINER:-edge-agent maintainers <edge-agent@example.org>}"
STAGE="$STAGEDIR/$PKG"
rm -rf "$STAGE"
install -d "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/usr/lib" "$STAGE/lib/systemd/system" \
  "$STAGE/etc/edge-agent" "$STAGE/usr/share/doc/edge-agent/examples" "$STAGE/usr/share/man/man1"

# The one-folder build, root-owned, u=rwX,go=rX whatever the build tree had.
cp -a "$ONEDIR" "$STAGE/usr/lib/edge-agent"
chmod -R u=rwX,go=rX "$STAGE/usr/lib/edge-agent"
chmod 0755 "$STAGE/usr/lib/edge-agent/edge-agent"
ln -s ../lib/edge-agent/edge-agent "$STAGE/usr/bin/edge-agent"
# The Debian way with a bundle (what dh_strip and dh_shlibdeps would do): a library the
# distribution ships (libssl3, zlib1g, libsqlite3-0, ...) is used from the system, not
# copied, so its security updates reach the agent (docs/install.md, "OpenSSL security
# updates"); the package depends on it instead. Shared objects are stripped, 0644, and carry
# no build-host RUNPATH (a pyenv Python's /root/.pyenv/... is meaningless on a plant server).
SHLIB_DEPENDS="$("$PY" - "$STAGE/usr/lib/edge-agent/_internal" <<'PYBUNDLE'
import filecmp, os, subprocess, sys
from pathlib import Path

internal = Path(sys.argv[1])
arch = subprocess.run(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"], capture_output=True,
                      text=True, check=True).stdout.strip()
depends = {}
for lib in sorted(internal.glob("*.so*")):
    for d in (f"/lib/{arch}", f"/usr/lib/{arch}"):
        system = Path(d, lib.name)
        # only a verbatim copy of the system's file (a pyenv libpython is not Debian's)
        if not system.is_file() or not filecmp.cmp(system, lib, shallow=False):
            continue
        owner = subprocess.run(["dpkg", "-S", str(system)], capture_output=True, text=True)
        if owner.returncode == 0:
            pkg = owner.stdout.split(":", 1)[0]
            version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg],
                                     capture_output=True, text=True, check=True).stdout
            depends[pkg] = version.rsplit("-", 1)[0] if "-" in version else version
            lib.unlink()
            break
if not {"libssl3", "libssl3t64"} & depends.keys():
    sys.exit("build_deb.sh: the build has no libssl.so.3 from the system's libssl3")
for path in internal.rglob("*"):
    if path.is_symlink() or not path.is_file():
        continue
    with path.open("rb") as f:
        if f.read(4) != b"\x7fELF":
            continue
    os.chmod(path, 0o644)
    subprocess.run(["strip", "--strip-unneeded", "--remove-section=.comment",
                    "--remove-section=.note", str(path)], check=True)
    rpath = subprocess.run(["patchelf", "--print-rpath", str(path)], capture_output=True,
                           text=True, check=True).stdout.strip()
    if rpath and not all(p.startswith("$ORIGIN") for p in rpath.split(":")):
        subprocess.run(["patchelf", "--remove-rpath", str(path)], check=True)
print(", ".join(f"{pkg} (>= {ver})" for pkg, ver in sorted(depends.items())))
PYBUNDLE
)"
install -m 0644 systemd/edge-agent.service "$STAGE/lib/systemd/system/edge-agent.service"

# The example config, with the buffer where the unit lets the agent write.
"$PY" - "$CONFIG" "$STAGE/etc/edge-agent/edge-agent.toml" <<'PYCONF'
import re, sys, tomllib
src, dst = sys.argv[1], sys.argv[2]
text = open(src, encoding="utf-8").read()
want = "/var/lib/edge-agent/buffer.db"
line = f'path = "{want}"  # the unit allows writes only under /var/lib/edge-agent'
doc = tomllib.loads(text)
if doc.get("buffer", {}).get("path") != want:
    m = re.search(r"(?m)^\[buffer\][^\n]*\n", text)
    if m is None:
        text = text.rstrip("\n") + f"\n\n[buffer]\n{line}\n"
    else:
        body_end = re.search(r"(?m)^\[", text[m.end():])
        end = m.end() + (body_end.start() if body_end else len(text) - m.end())
        body = text[m.end():end]
        body, n = re.subn(r"(?m)^path\s*=.*$", line, body)
        if n == 0:
            body = line + "\n" + body
        text = text[:m.end()] + body + text[end:]
    doc = tomllib.loads(text)
    assert doc["buffer"]["path"] == want, doc.get("buffer")
open(dst, "w", encoding="utf-8").write(text)
PYCONF
chmod 0640 "$STAGE/etc/edge-agent/edge-agent.toml"
chmod 0750 "$STAGE/etc/edge-agent"

DOC="$STAGE/usr/share/doc/edge-agent"
for f in docs/install.md docs/alerts.md docs/prometheus-rules.yml; do
  [[ -f "$f" ]] && install -m 0644 "$f" "$DOC/"
done
install -m 0644 "$CONFIG" "$DOC/example.toml"
# One sample per adapter, named <kind>-<type>.toml (sources-opcua.toml, sinks-https.toml, ...)
for sample in adapters/*/*/sample.toml; do
  kind="$(basename "$(dirname "$(dirname "$sample")")")"
  type="$(basename "$(dirname "$sample")")"
  install -m 0644 "$sample" "$DOC/examples/$kind-$type.toml"
done
ls "$DOC/examples/"*.toml >/dev/null 2>&1 || { echo "build_deb.sh: no adapters/*/*/sample.toml" >&2; exit 1; }
# edge-agent(1) from the CLI's own help, dated like the changelog (reproducible builds)
BUILD_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
"$PY" packaging/manpage.py "$STAGE/usr/share/man/man1/edge-agent.1" \
  --date "$(date -u -d "@$BUILD_EPOCH" +%Y-%m-%d)"
gzip -9n "$STAGE/usr/share/man/man1/edge-agent.1"
chmod 0644 "$STAGE/usr/share/man/man1/edge-agent.1.gz"
cat > "$DOC/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edge-agent

Files: *
Copyright: 2026 The edge-agent authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
chmod 0644 "$DOC/copyright"
printf 'edge-agent (%s) stable; urgency=medium\n\n  * Release %s.\n\n -- %s  %s\n' \
  "$VERSION" "$VERSION" "$MAINTAINER" "$(date -R -u -d "@$BUILD_EPOCH")" \
  | gzip -9n > "$DOC/changelog.gz"
chmod 0644 "$DOC/changelog.gz"

install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$STAGE/DEBIAN/"
echo "/etc/edge-agent/edge-agent.toml" > "$STAGE/DEBIAN/conffiles"
SIZE_KB="$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)"
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: edge-agent
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $SIZE_KB
Depends: libc6 (>= $GLIBC), $SHLIB_DEPENDS, adduser, init-system-helpers (>= 1.54~)
Section: net
Priority: optional
Homepage: https://example.invalid/edge-agent
Description: plant-edge store-and-forward agent
 Collects OPC UA, MES and file events on a plant server, buffers them durably on
 disk and forwards them in order, exactly once per sequence, to the central
 gateway over HTTPS or MQTT. Runs as the hardened systemd service edge-agent,
 exposes Prometheus metrics on 127.0.0.1:9464 and answers 'edge-agent status'.
CONTROL
( cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort \
    | xargs -d '\n' md5sum > DEBIAN/md5sums )
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles" "$STAGE/DEBIAN/md5sums"

mkdir -p "$OUTDIR"
OUT="$OUTDIR/$PKG.deb"
fakeroot dpkg-deb --build -Zgzip --root-owner-group "$STAGE" "$OUT" >/dev/null
echo "built $OUT"
