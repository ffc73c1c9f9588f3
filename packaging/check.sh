#!/usr/bin/env bash
# The Debian package, built, installed on this machine and checked: the
# monitoring files (promtool, a JSON parse), then the package (cargo-deb),
# its unit (systemd-analyze), the binary and configuration it installs, and
# the service user running the binary. For CI and build machines: run as
# root on Debian; it installs the tools it lacks, installs the package and
# purges it again at the end, and refuses to start where cancelwatch is
# already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { printf '== packaging: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "packaging/check.sh installs a package: run it as root" >&2
    exit 1
fi
if dpkg-query -W -f='${Status}' cancelwatch 2>/dev/null | grep -q 'ok installed'; then
    echo "cancelwatch is installed here; this check installs and purges its own build." >&2
    echo "Run it on a build machine, or remove it first: dpkg --purge cancelwatch" >&2
    exit 1
fi

# ---- tools ------------------------------------------------------------------
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v promtool >/dev/null || missing+=(prometheus)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! cargo deb --version >/dev/null 2>&1; then
    step "installing cargo-deb"
    cargo install cargo-deb --locked --version 3.8.0
fi

work=$(mktemp -d)
serve=
cleanup() {
    if [ -n "$serve" ]; then kill "$serve" 2>/dev/null || true; fi
    if dpkg-query -W -f='${Status}' cancelwatch 2>/dev/null | grep -q 'installed'; then
        dpkg --purge cancelwatch >/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# ---- monitoring files -------------------------------------------------------
step "alerting rules"
promtool check rules packaging/prometheus/cancelwatch-rules.yml
step "dashboard"
python3 -m json.tool packaging/grafana/cancelwatch.json >/dev/null
# The dashboard's queries as recording rules, so that promtool parses their
# PromQL too (JSON is YAML).
python3 - packaging/grafana/cancelwatch.json >"$work/dashboard-queries.yml" <<'EOF'
import json, sys
dashboard = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
print(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
EOF
promtool check rules "$work/dashboard-queries.yml"

# ---- the package --------------------------------------------------------------
# CI checks the package's making, contents and installation with the dev
# profile, whose artifacts the test run has just built (a release build from
# cold would double CI's time); a release package is `cargo deb -p cancelwatch`
# (DEB_PROFILE=release here).
profile=${DEB_PROFILE:-dev}
step "building the package (the $profile profile)"
build_started=$SECONDS
deb=$(cargo deb -p cancelwatch --locked --profile "$profile" | tail -n 1)
step "built $deb in $((SECONDS - build_started)) s"
dpkg -i "$deb"

step "what it installed"
cancelwatch --version
cancelwatch --config /etc/cancelwatch/cancelwatch.toml check-config >"$work/check-config.txt" ||
    { cat "$work/check-config.txt" >&2; exit 1; }
grep '^# ' "$work/check-config.txt"
grep -qx 'url = "sqlite:///var/lib/cancelwatch/cancelwatch.db"' "$work/check-config.txt" ||
    { echo "the installed configuration does not put the database in /var/lib/cancelwatch" >&2; exit 1; }
conffiles=$(dpkg-query -W -f='${Conffiles}\n' cancelwatch | awk 'NF {print $1}' | sort | xargs)
test "$conffiles" = "/etc/cancelwatch/cancelwatch.env /etc/cancelwatch/cancelwatch.toml" ||
    { echo "conffiles: $conffiles" >&2; exit 1; }
test "$(stat -c '%a %U' /etc/cancelwatch/cancelwatch.env)" = "600 root"
id cancelwatch
unit=$(dpkg -L cancelwatch | grep '/cancelwatch\.service$')
systemd-analyze verify "$unit"
# The sandbox's exposure as systemd scores it, from 0 (best) to 10; the
# threshold counts tenths: at most 2.0.
systemd-analyze security --offline=true --threshold=20 "$unit" >"$work/security.txt" ||
    { cat "$work/security.txt" >&2; exit 1; }
tail -n 1 "$work/security.txt"

step "the service user runs the installed binary"
chown cancelwatch:cancelwatch "$work"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
service=(setpriv --reuid=cancelwatch --regid=cancelwatch --init-groups env
    CANCELWATCH_DATABASE__URL="sqlite://$work/cancelwatch.db"
    CANCELWATCH_SERVER__LISTEN="127.0.0.1:$port"
    cancelwatch --config /etc/cancelwatch/cancelwatch.toml)
"${service[@]}" migrate
"${service[@]}" serve 2>"$work/serve.log" &
serve=$!
ready() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "http://127.0.0.1:$port/readyz" 2>/dev/null
}
for _ in $(seq 300); do
    ready && break
    kill -0 "$serve" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
    sleep 0.1
done
ready || { echo "serve never became ready" >&2; cat "$work/serve.log" >&2; exit 1; }
"${service[@]}" backup --to "$work/backup.db"
kill -TERM "$serve"
wait "$serve" || { echo "serve did not stop cleanly on SIGTERM" >&2; cat "$work/serve.log" >&2; exit 1; }
serve=

step "done in $((SECONDS - started)) s"
