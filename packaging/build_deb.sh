#!/usr/bin/env bash
# Build dist/edge-agent_<version>_<arch>.deb from dist/edge-agent (see build_binary.sh).
#
#   packaging/build_deb.sh                 # uses dist/edge-agent, builds it if missing
#   packaging/build_deb.sh --binary PATH   # package an already built binary
#   packaging/build_deb.sh --config PATH   # another example config (default config/example.toml)
#   packaging/build_deb.sh --out DIR       # write the .deb (and its staging tree) to DIR
#
# Contents: /usr/bin/edge-agent, /lib/systemd/system/edge-agent.service,
# /etc/edge-agent/edge-agent.toml (conffile, from config/example.toml with the buffer in
# /var/lib/edge-agent), docs in /usr/share/doc/edge-agent. Maintainer scripts in
# packaging/deb/. Needs dpkg-deb and fakeroot (apt-get install dpkg-dev fakeroot).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BINARY="$ROOT/dist/edge-agent"
CONFIG="$ROOT/config/example.toml"
OUTDIR="$ROOT/dist"
STAGEDIR="$ROOT/build/deb"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) BINARY="$(realpath "$2")"; shift 2 ;;
    --config) CONFIG="$(realpath "$2")"; shift 2 ;;
    --out) OUTDIR="$(realpath -m "$2")"; STAGEDIR="$OUTDIR/stage"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build_deb.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

for tool in dpkg-deb fakeroot; do
  command -v "$tool" >/dev/null || {
    echo "build_deb.sh: $tool not found (apt-get install dpkg-dev fakeroot)" >&2; exit 1; }
done
PY="${PYTHON:-python3}"
[[ -x "$BINARY" ]] || "$ROOT/packaging/build_binary.sh" --use-current
[[ -f "$CONFIG" ]] || {
  echo "build_deb.sh: $CONFIG is missing (it becomes /etc/edge-agent/edge-agent.toml)" >&2
  exit 1; }

VERSION="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
ARCH="$(dpkg --print-architecture)"
GLIBC="$(getconf GNU_LIBC_VERSION | awk '{print $2}')"
PKG="edge-agent_${VERSION}_${ARCH}"
MAINTAINER="${DEB_MAINTAINER:-edge-agent maintainers <edge-agent@example.org>}"
STAGE="$STAGEDIR/$PKG"
rm -rf "$STAGE"
install -d "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/lib/systemd/system" \
  "$STAGE/etc/edge-agent" "$STAGE/usr/share/doc/edge-agent"

install -m 0755 "$BINARY" "$STAGE/usr/bin/edge-agent"
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
  "$VERSION" "$VERSION" "$MAINTAINER" "$(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" \
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
Depends: libc6 (>= $GLIBC), adduser
Section: net
Priority: optional
Homepage: https://example.invalid/edge-agent
Description: plant-edge store-and-forward agent
 Collects OPC UA, MES and file events on a plant server, buffers them durably on
 disk and forwards them in order, exactly once per sequence, to the central
 gateway over HTTPS or MQTT. Runs as the hardened systemd service edge-agent,
 exposes Prometheus metrics on 127.0.0.1:9464 and answers 'edge-agent status'.
CONTROL
( cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -print | sed 's#^\./##' | sort \
    | xargs md5sum > DEBIAN/md5sums )
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles" "$STAGE/DEBIAN/md5sums"

mkdir -p "$OUTDIR"
OUT="$OUTDIR/$PKG.deb"
fakeroot dpkg-deb --build -Zgzip --root-owner-group "$STAGE" "$OUT" >/dev/null
echo "built $OUT"
