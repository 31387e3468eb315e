#!/usr/bin/env bash
# Remove what scripts/install-service.sh installed.
#
#   scripts/uninstall-service.sh [--user] [--prefix DIR] [--dry-run] [--purge]
# Stops and disables the units, removes them and the venv. The config and the database are
# kept unless --purge is given (it also removes the kimi-syncd-api group).
set -euo pipefail

MODE=system PREFIX="" DRY=0 PURGE=0
API_GROUP=kimi-syncd-api

usage() { sed -n '2,7s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
    case $1 in
        --user) MODE=user ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --dry-run) DRY=1 ;;
        --purge) PURGE=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "uninstall-service: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ -z "$PREFIX" ] || PREFIX=$(realpath -m "$PREFIX")

run() {
    printf '+ %s\n' "$*"
    [ "$DRY" = 1 ] || "$@"
}

if [ "$MODE" = system ]; then
    if [ -z "$PREFIX" ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
        echo "uninstall-service: the system service needs root (or use --user)" >&2
        exit 1
    fi
    VENV=/opt/kimi-syncd
    UNITS=/etc/systemd/system
    CONF=/etc/kimi-syncd
    STATE=(/var/lib/kimi-syncd /var/lib/private/kimi-syncd)
    SYSTEMCTL=(systemctl)
    running() { [ -d /run/systemd/system ]; }
else
    : "${HOME:?HOME is not set}"
    VENV=$HOME/.local/share/kimi-syncd/venv
    UNITS=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
    CONF=${XDG_CONFIG_HOME:-$HOME/.config}/kimi-syncd
    STATE=("$HOME/.local/state/kimi-syncd")
    SYSTEMCTL=(systemctl --user)
    running() { systemctl --user show-environment >/dev/null 2>&1; }
fi

live=0
if [ -z "$PREFIX" ] && running; then
    live=1
    run "${SYSTEMCTL[@]}" disable --now kimi-syncd.socket kimi-syncd.service || true
fi
run rm -f "$PREFIX$UNITS/kimi-syncd.service" "$PREFIX$UNITS/kimi-syncd.socket"
run rm -rf "$PREFIX$UNITS/kimi-syncd.service.d" "$PREFIX$UNITS/kimi-syncd.socket.d"
[ "$live" = 0 ] || run "${SYSTEMCTL[@]}" daemon-reload
run rm -rf "$PREFIX$VENV"

if [ "$PURGE" = 1 ]; then
    run rm -rf "$PREFIX$CONF"
    for dir in "${STATE[@]}"; do
        run rm -rf "$PREFIX$dir"
    done
    if [ "$MODE" = system ] && [ -z "$PREFIX" ] && getent group "$API_GROUP" >/dev/null; then
        run groupdel "$API_GROUP"
    fi
else
    echo "kept the config ($PREFIX$CONF) and the database (${STATE[*]}): --purge removes them"
fi
