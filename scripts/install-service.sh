#!/usr/bin/env bash
# Install kimi-syncd as a systemd service from this checkout.
#
#   scripts/install-service.sh            system service (as root): venv /opt/kimi-syncd,
#                                         units in /etc/systemd/system, config /etc/kimi-syncd
#   scripts/install-service.sh --user     user service: venv ~/.local/share/kimi-syncd/venv,
#                                         units in ~/.config/systemd/user, config ~/.config/kimi-syncd
# Options:
#   --prefix DIR      install under DIR (a staging root, like DESTDIR); systemctl is not run
#   --dry-run         print what would be done, change nothing
#   --find-links DIR  install kimi-syncd and its dependencies offline from wheels in DIR
#                     (pip --no-index) instead of building this checkout
#   --no-start        install and enable nothing at runtime (no systemctl calls)
# Re-running upgrades the venv in place and keeps an existing config.toml.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=system PREFIX="" DRY=0 LINKS="" START=1
PYTHON=${PYTHON:-python3}
API_GROUP=kimi-syncd-api

usage() { sed -n '2,15s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
    case $1 in
        --user) MODE=user ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --dry-run) DRY=1 ;;
        --find-links) LINKS=${2:?--find-links needs a directory}; shift ;;
        --find-links=*) LINKS=${1#*=} ;;
        --no-start) START=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install-service: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ -z "$PREFIX" ] || PREFIX=$(realpath -m "$PREFIX")

# Print every action; run it unless --dry-run.
run() {
    printf '+ %s\n' "$*"
    [ "$DRY" = 1 ] || "$@"
}

if [ "$MODE" = system ]; then
    if [ -z "$PREFIX" ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
        echo "install-service: the system service needs root (or use --user)" >&2
        exit 1
    fi
    VENV=/opt/kimi-syncd
    UNITS=/etc/systemd/system
    CONF=/etc/kimi-syncd
    UNIT_SRC=$SRC/systemd
    SYSTEMCTL=(systemctl)
else
    : "${HOME:?HOME is not set}"
    VENV=$HOME/.local/share/kimi-syncd/venv
    UNITS=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
    CONF=${XDG_CONFIG_HOME:-$HOME/.config}/kimi-syncd
    STATE=$HOME/.local/state/kimi-syncd
    UNIT_SRC=$SRC/systemd/user
    SYSTEMCTL=(systemctl --user)
fi

# 1. The venv. Not under /root or /home for the system service: ProtectHome= hides them.
if [ ! -x "$PREFIX$VENV/bin/python" ]; then
    run "$PYTHON" -m venv "$PREFIX$VENV"
fi
if [ -n "$LINKS" ]; then
    run "$PREFIX$VENV/bin/python" -m pip install --quiet --no-index --find-links "$LINKS" \
        --upgrade kimi-syncd
else
    run "$PREFIX$VENV/bin/python" -m pip install --quiet --upgrade "$SRC"
fi
# ProtectSystem=strict makes the venv read-only at run time: compile the bytecode now.
run "$PREFIX$VENV/bin/python" -m compileall -q -j 0 "$PREFIX$VENV/lib"

# 2. The group that may use the system API socket (SocketGroup= of kimi-syncd.socket).
if [ "$MODE" = system ]; then
    if [ -n "$PREFIX" ]; then
        echo "(prefix install: create the group yourself: groupadd --system $API_GROUP)"
    elif ! getent group "$API_GROUP" >/dev/null; then
        run groupadd --system "$API_GROUP"
    fi
fi

# 3. Units and config.
run install -d -m 0755 "$PREFIX$UNITS"
for unit in kimi-syncd.service kimi-syncd.socket; do
    run install -m 0644 "$UNIT_SRC/$unit" "$PREFIX$UNITS/$unit"
done
run install -d -m 0755 "$PREFIX$CONF"
if [ -e "$PREFIX$CONF/config.toml" ]; then
    echo "keeping $PREFIX$CONF/config.toml"
elif [ -f "$SRC/config.example.toml" ]; then
    # 0644: the daemon runs as a dynamic user; secrets belong in the upstream-token credential.
    run install -m 0644 "$SRC/config.example.toml" "$PREFIX$CONF/config.toml"
else
    echo "install-service: no config.example.toml in $SRC; the daemon's defaults apply" >&2
fi
if [ "$MODE" = user ]; then
    run install -d -m 0700 "$PREFIX$STATE"
fi

# 4. Start listening. Nothing runs the daemon until the first API call.
systemd_running() {
    if [ "$MODE" = system ]; then
        [ -d /run/systemd/system ]
    else
        "${SYSTEMCTL[@]}" show-environment >/dev/null 2>&1
    fi
}
ACTIONS=(
    "${SYSTEMCTL[*]} daemon-reload"
    "${SYSTEMCTL[*]} enable --now kimi-syncd.socket"
    "${SYSTEMCTL[*]} try-restart kimi-syncd.service"
)
if [ "$START" = 1 ] && [ -z "$PREFIX" ] && systemd_running; then
    for action in "${ACTIONS[@]}"; do
        read -ra words <<<"$action"
        run "${words[@]}"
    done
else
    echo "systemd is not managing this system (or --prefix/--no-start): run these yourself:"
    printf '    %s\n' "${ACTIONS[@]}"
    if [ "$MODE" = user ]; then
        echo "    loginctl enable-linger \"\$USER\"   # to keep it running without a login"
    fi
fi
echo "kimi-syncd installed ($MODE): $PREFIX$VENV/bin/kimi-syncd, units in $PREFIX$UNITS"
