#!/usr/bin/env bash
# Installs the tools the deployment tests drive (the tests run the real ones, not stand-ins),
# idempotently:
#   - promtool + prometheus   Debian package `prometheus`
#   - systemd-analyze          Debian package `systemd`
#   - pm2                      npm registry, into ./.tools (git-ignored), never globally
#   - node + npm               Debian packages `nodejs npm`, only when node is absent
#
# Runs as root on a fresh Debian machine (CI) or as-is on a developer's machine; a second run
# installs nothing. It never starts a service: Debian's maintainer scripts would start
# prometheus on install, so a temporary policy-rc.d answers 101 ("action forbidden") while apt runs.
#
# Usage: bash .ci/install-tools.sh        (from anywhere; paths are relative to the repo root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PM2_MAJOR="${PM2_MAJOR:-7}"
TOOLS_DIR="$ROOT/.tools"

log() { echo "install-tools: $*"; }

need_apt=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    need_apt+=(prometheus)
fi
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# train.compile on a CPU: torch.compile's inductor builds its kernels with a C++ compiler.
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)

if ((${#need_apt[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "need root to apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# installed by minerd .ci/install-tools.sh while apt runs\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    cleanup() { if ((made_policy)); then rm -f "$policy"; fi; }
    trap cleanup EXIT
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get update -qq
    log "apt-get install ${need_apt[*]}"
    # No recommends: they would pull node-exporter and friends, services we neither need nor start.
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    cleanup
    trap - EXIT
else
    log "promtool, prometheus, systemd-analyze, node, npm already present"
fi

# Any pm2 command, even `pm2 --version`, spawns a daemon under $PM2_HOME (default ~/.pm2):
# read the version from the installed package.json instead of running pm2 here.
PM2="$TOOLS_DIR/node_modules/.bin/pm2"
pm2_version() {
    node -p "require('$TOOLS_DIR/node_modules/pm2/package.json').version" 2>/dev/null || true
}
if [[ -x $PM2 ]] && [[ $(pm2_version) == "${PM2_MAJOR}."* ]]; then
    log "pm2 $(pm2_version) already in .tools/"
else
    log "npm install pm2@${PM2_MAJOR} into .tools/"
    mkdir -p "$TOOLS_DIR"
    # Own package.json so npm does not walk up and treat the repo as a package.
    [[ -f $TOOLS_DIR/package.json ]] || echo '{"name":"minerd-tools","private":true}' >"$TOOLS_DIR/package.json"
    npm install --prefix "$TOOLS_DIR" --no-audit --no-fund --loglevel=error "pm2@${PM2_MAJOR}" >/dev/null
fi

# Report versions.
log "promtool: $(promtool --version 2>&1 | head -1)"
log "prometheus: $(prometheus --version 2>&1 | head -1)"
log "systemd-analyze: $(systemd-analyze --version | head -1)"
log "node: $(node --version)"
log "pm2: $(pm2_version) ($PM2)"
