#!/usr/bin/env bash
# `make system-test`: kimi-syncd's units under a REAL systemd.
#
# PID 1 on the development machines is not systemd, so this boots one in a container:
# systemd-nspawn on a debootstrap'd Debian tree (see shared notes/systemd.md). Steps:
#   1. base tree: debootstrap --variant=minbase once, cached in $CACHE/base (~60-75 s);
#      every run starts from a fresh copy of it ($CACHE/run)
#   2. wheels: the project wheel + its dependencies, built/downloaded on the host (pip inside
#      the tree cannot reach the package index), installed inside with --no-index
#   3. boot with --private-network (the container has its own loopback), then inside it
#      scripts/install-service.sh --find-links, exactly as an admin would run it
#   4. checks, against units built from systemd/ and systemd/user/:
#      - kimi-syncd-probe: the same units with only names and ExecStart= changed, running
#        tests/system/probe.py (kimi_syncd.systemd + asyncio + SQLite in the full sandbox);
#        usable before the daemon exists; system units, and user units under a lingering
#        user's manager (installed with install-service.sh --user)
#      - kimi-syncd itself, once kimi_syncd.daemon is importable, with a test drop-in
#        (WatchdogSec=3s, upstream = kimi_syncd.sim run inside the container after the reboot)
#      readiness (start returns only after READY=1), lazy socket activation on the first
#      API call, SIGKILL -> restart, watchdog stall -> restart, exit 78 -> no crash loop,
#      reload, clean stop, optional credential, socket access by group, an outbox message
#      kept across SIGKILL, a SIGSTOPped daemon restarted by the watchdog, a container reboot
#      that keeps the SQLite databases, messages queued before it delivered to the sim once it
#      is up, and last
#      uninstall-service.sh (--user, and --purge).
# Exits 0 with "SKIP: ..." when it cannot run here (not root, no nspawn/debootstrap, no boot).
# Environment: KIMI_SYSTEST_CACHE (default /var/cache/kimi-syncd-systest), KEEP=1 leaves
# the container running at the end (prints how to enter it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${KIMI_SYSTEST_CACHE:-/var/cache/kimi-syncd-systest}
BASE=$CACHE/base
TREE=$CACHE/run
WORK=$ROOT/.system-test
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,curl,procps,libpam-systemd,dbus-user-session
HOST_PY=$ROOT/.venv/bin/python
[ -x "$HOST_PY" ] || HOST_PY=python3

say() { printf '[system-test %(%T)T] %s\n' -1 "$*"; }
skip() {
    echo "SKIP: system test: $*"
    exit 0
}

[ "$(id -u)" = 0 ] || skip "needs root (systemd-nspawn, debootstrap)"
for tool in systemd-nspawn debootstrap; do
    if ! command -v "$tool" >/dev/null; then
        say "installing systemd-container and debootstrap"
        { apt-get update -qq && apt-get install -y -qq systemd-container debootstrap; } \
            >/dev/null 2>&1 || skip "systemd-nspawn/debootstrap are missing and cannot be installed"
        break
    fi
done
command -v nsenter >/dev/null || skip "nsenter (util-linux) is missing"

mkdir -p "$CACHE" "$WORK"
exec 9>"$CACHE/lock"
flock -w 900 9 || skip "another system test holds $CACHE/lock"
: >"$WORK/checks.log"

# --- 1. base tree ---------------------------------------------------------------------------
if [ "$(cat "$BASE/.kimi-systest-base" 2>/dev/null)" != "$PACKAGES" ]; then
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /^http/ { print $2; exit }' \
        /etc/apt/sources.list 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "building the base tree with debootstrap from $mirror (about a minute, once)"
    rm -rf "$BASE" "$BASE.tmp"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$BASE.tmp" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || skip "debootstrap failed, see $WORK/debootstrap.log"
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$BASE.tmp/etc/hosts"
    echo systest >"$BASE.tmp/etc/hostname"
    echo "$PACKAGES" >"$BASE.tmp/.kimi-systest-base"
    mv "$BASE.tmp" "$BASE"
fi

# --- 2. wheels ------------------------------------------------------------------------------
pyver=$(chroot "$BASE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
say "building wheels for the tree's Python $pyver"
rm -rf "$WORK/wheels"
"$HOST_PY" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/wheels" "$ROOT" >"$WORK/pip.log" 2>&1 ||
    { cat "$WORK/pip.log"; echo "FAIL: cannot build the project wheel"; exit 1; }
"$HOST_PY" -m pip download --quiet --only-binary=:all: --python-version "$pyver" \
    --dest "$WORK/wheels" "$WORK"/wheels/kimi_syncd-*.whl >>"$WORK/pip.log" 2>&1 ||
    skip "cannot download the dependencies' wheels (no package index?), see $WORK/pip.log"

rm -rf "$TREE"
cp -a --reflink=auto "$BASE" "$TREE"
# World-readable, for the user-service install too.
IN=/srv/kimi-syncd
mkdir -p "$TREE$IN/src/tests/system"
cp -r "$ROOT/scripts" "$ROOT/systemd" "$TREE$IN/src/"
cp "$ROOT/tests/system/probe.py" "$TREE$IN/src/tests/system/"
[ ! -f "$ROOT/config.example.toml" ] || cp "$ROOT/config.example.toml" "$TREE$IN/src/"
cp -r "$WORK/wheels" "$TREE$IN/wheels"
chmod -R a+rX "$TREE$IN"

# --- 3. boot --------------------------------------------------------------------------------
NSPAWN="" CPID=""
ct() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 nsenter -t "$CPID" -a "$@"; }

cleanup_cgroups() {
    # nspawn leaves empty payload/supervisor cgroups next to our own.
    local own hier dir
    own=$(awk -F: '$1 == "0" { print $3 }' /proc/self/cgroup)
    for hier in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd /sys/fs/cgroup; do
        for dir in "$hier${own%/}/payload" "$hier${own%/}/supervisor"; do
            if [ -d "$dir" ]; then find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
        done
    done
}

boot() {
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D "$TREE" --register=no --keep-unit \
        --private-network --capability=CAP_BPF,CAP_PERFMON --system-call-filter=bpf \
        --console=read-only -b >>"$WORK/console.log" 2>&1 </dev/null &
    NSPAWN=$!
    CPID=""
    local _
    for _ in $(seq 100); do
        CPID=$(cat /proc/"$NSPAWN"/task/*/children 2>/dev/null | awk '{ print $1; exit }') || true
        [ -n "$CPID" ] && [ "$(cat /proc/"$CPID"/comm 2>/dev/null)" = systemd ] && break
        CPID=""
        kill -0 "$NSPAWN" 2>/dev/null || return 1
        sleep 0.1
    done
    [ -n "$CPID" ] || return 1
    local state="" deadline=$((SECONDS + 60))
    # Until PID 1 listens on its private socket, systemctl fails at once: poll.
    while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$NSPAWN" 2>/dev/null; do
        state=$(timeout 60 env -i PATH=/usr/bin:/bin nsenter -t "$CPID" -a \
            systemctl is-system-running --wait 2>/dev/null) || true
        case $state in running | degraded) break ;; esac
        sleep 0.2
    done
    say "container booted: init pid $CPID, system ${state:-unknown}"
    [ "$state" = running ] || [ "$state" = degraded ]
}

halt() { # how: poweroff | reboot; waits for nspawn to exit
    local how=$1
    [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null || return 0
    ct systemctl "$how" --no-block >/dev/null 2>&1 || kill -TERM "$NSPAWN" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$NSPAWN" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$NSPAWN" 2>/dev/null || true
    wait "$NSPAWN" 2>/dev/null || true
    NSPAWN=""
    cleanup_cgroups
}

finish() {
    if [ "${KEEP:-0}" = 1 ] && [ -n "$NSPAWN" ]; then
        echo "container left running: nsenter -t $CPID -a bash   (nspawn pid $NSPAWN)"
    else
        halt poweroff
    fi
}
trap finish EXIT

: >"$WORK/console.log"
say "booting $TREE"
boot || { halt poweroff; skip "the container did not boot, see $WORK/console.log"; }

# --- 4. checks ------------------------------------------------------------------------------
PASSED=0 FAILED=0
check() { # check NAME CMD...: run CMD in a subshell with errexit, count it, show a failure's log
    local name=$1 rc
    shift
    echo "== $name" >>"$WORK/checks.log"
    set +e
    (
        set -e
        "$@"
    ) >>"$WORK/checks.log" 2>&1
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1))
        say "ok   $name"
    else
        FAILED=$((FAILED + 1))
        say "FAIL $name"
        awk -v h="== $name" '$0 == h { on = 1 } on' "$WORK/checks.log" | tail -n 25 | sed 's/^/     /'
    fi
}
eventually() { # eventually SECONDS CMD...
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}
# MODE=system: the system manager, as root. MODE=user: alice's user manager, as alice.
MODE=system
ALICE=alice
as_alice() {
    local uid
    uid=$(ct id -u "$ALICE")
    ct setpriv --reuid="$uid" --regid="$uid" --init-groups env -i HOME="/home/$ALICE" \
        USER="$ALICE" PATH=/usr/bin:/bin XDG_RUNTIME_DIR="/run/user/$uid" LANG=C.UTF-8 "$@"
}
sctl() {
    if [ "$MODE" = user ]; then as_alice systemctl --user "$@"; else ct systemctl "$@"; fi
}
get() { # get UNIT PATH: an HTTP GET on the unit's socket
    if [ "$MODE" = user ]; then
        as_alice curl -sS --max-time 10 --unix-socket "/run/user/$(ct id -u "$ALICE")/$1.sock" \
            "http://kimi$2"
    else
        ct curl -sS --max-time 10 --unix-socket "/run/$1.sock" "http://kimi$2"
    fi
}
prop() { sctl show -P "$2" "$1"; }
is() { [ "$(prop "$1" "$2")" = "$3" ]; }
field() { "$HOST_PY" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# Installation, as an admin would do it.
install_service() {
    ct $IN/src/scripts/install-service.sh --find-links $IN/wheels
    ct systemctl is-active kimi-syncd.socket
    [ "$(ct stat -c '%U:%G %a' /run/kimi-syncd.sock)" = "root:kimi-syncd-api 660" ]
    ct systemd-analyze verify kimi-syncd.service kimi-syncd.socket
}
check "install-service.sh installs and enables kimi-syncd.socket" install_service

# The probe: the real units with names and ExecStart= changed.
install_probe() {
    local sed_names='s/kimi-syncd\.socket/kimi-syncd-probe.socket/g
s/kimi-syncd\.service/kimi-syncd-probe.service/g
s|%t/kimi-syncd\.sock|%t/kimi-syncd-probe.sock|
s/^\(StateDirectory\|RuntimeDirectory\)=kimi-syncd$/\1=kimi-syncd-probe/
s|^ExecStart=.*|ExecStart=/opt/kimi-syncd/bin/python /opt/kimi-syncd-probe/probe.py|'
    local etc=$TREE/etc/systemd/system
    mkdir -p "$TREE/opt/kimi-syncd-probe" "$etc/kimi-syncd-probe.service.d"
    cp "$TREE$IN/src/tests/system/probe.py" "$TREE/opt/kimi-syncd-probe/"
    sed "$sed_names" "$ROOT/systemd/kimi-syncd.service" >"$etc/kimi-syncd-probe.service"
    sed "$sed_names" "$ROOT/systemd/kimi-syncd.socket" >"$etc/kimi-syncd-probe.socket"
    printf '[Service]\nEnvironment=PROBE_READY_DELAY=2\nWatchdogSec=3s\n' \
        >"$etc/kimi-syncd-probe.service.d/test.conf"
    ct systemctl daemon-reload
    ct systemctl enable --now kimi-syncd-probe.socket
}
check "probe units installed" install_probe

lazy_activation() { # UNIT
    is "$1.service" ActiveState inactive
    get "$1" /v1/health
    is "$1.service" ActiveState active
}
start_waits_for_ready() { # UNIT MIN_SECONDS
    sctl stop "$1.service"
    local t0=$SECONDS
    sctl start "$1.service"
    local took=$((SECONDS - t0))
    echo "systemctl start took ${took}s"
    is "$1.service" ActiveState active
    is "$1.service" SubState running
    [ "$took" -ge "$2" ]
    get "$1" /v1/health
}
restarts_after_kill() { # UNIT
    local pid restarts
    pid=$(prop "$1.service" MainPID) restarts=$(prop "$1.service" NRestarts)
    sctl kill -s KILL "$1.service"
    eventually 15 is "$1.service" NRestarts $((restarts + 1))
    eventually 15 is "$1.service" SubState running
    [ "$(prop "$1.service" MainPID)" != "$pid" ]
    get "$1" /v1/health
}
stops_cleanly() { # UNIT
    get "$1" /v1/health >/dev/null
    sctl stop "$1.service"
    is "$1.service" Result success
    is "$1.service" ExecMainStatus 0
    is "$1.socket" ActiveState active
}

# Probe-only checks (behaviour a test can provoke on demand).
watchdog_restarts() {
    local restarts
    restarts=$(prop kimi-syncd-probe.service NRestarts)
    get kimi-syncd-probe /stall
    eventually 20 is kimi-syncd-probe.service NRestarts $((restarts + 1))
    ct journalctl -u kimi-syncd-probe --no-pager | grep -q "Failed with result 'watchdog'"
}
config_error_is_not_restarted() {
    get kimi-syncd-probe /exit/78 || true
    eventually 10 is kimi-syncd-probe.service ActiveState failed
    sleep 3 # > RestartSec
    is kimi-syncd-probe.service ActiveState failed
    is kimi-syncd-probe.service ExecMainStatus 78
    is kimi-syncd-probe.socket ActiveState active
    ct systemctl reset-failed kimi-syncd-probe.service
}
reload_works() {
    get kimi-syncd-probe /v1/health >/dev/null
    local pid
    pid=$(prop kimi-syncd-probe.service MainPID)
    ct systemctl reload kimi-syncd-probe.service
    eventually 10 is kimi-syncd-probe.service StatusText reloaded
    is kimi-syncd-probe.service MainPID "$pid"
}
optional_credential() {
    # LoadCredential=upstream-token (no path) searches /etc/credstore and skips a missing one.
    local drop=$TREE/etc/systemd/system/kimi-syncd-probe.service.d/cred.conf
    printf '[Service]\nLoadCredential=upstream-token\n' >"$drop"
    ct systemctl daemon-reload
    ct systemctl restart kimi-syncd-probe.service
    [ "$(get kimi-syncd-probe /v1/health | field credentials)" = "[]" ]
    install -d -m 0700 "$TREE/etc/credstore"
    install -m 0600 /dev/null "$TREE/etc/credstore/upstream-token"
    echo -n test-token >"$TREE/etc/credstore/upstream-token"
    ct systemctl restart kimi-syncd-probe.service
    [ "$(get kimi-syncd-probe /v1/health | field credentials)" = "['upstream-token']" ]
    rm -f "$drop" "$TREE/etc/credstore/upstream-token"
    ct systemctl daemon-reload
}
group_access() {
    ct id tester >/dev/null 2>&1 || ct useradd -m -G kimi-syncd-api tester
    ct id outsider >/dev/null 2>&1 || ct useradd -m outsider
    local gid reply
    gid=$(ct getent group kimi-syncd-api | cut -d: -f3)
    reply=$(ct runuser -u tester -- curl -sS --unix-socket /run/kimi-syncd-probe.sock \
        http://kimi/v1/health)
    echo "$reply"
    # The daemon must see the real uid and groups (no PrivateUsers=) to apply write_group.
    echo "$reply" | "$HOST_PY" -c '
import json, sys
peer = json.load(sys.stdin)["peer"]
assert peer["uid"] == int(sys.argv[1]) and int(sys.argv[2]) in peer["groups"], peer' \
        "$(ct id -u tester)" "$gid"
    ! ct runuser -u outsider -- curl -sS --unix-socket /run/kimi-syncd-probe.sock \
        http://kimi/v1/health
}

probe_starts=""
probe_checks() {
    check "probe: lazy socket activation on the first API call" lazy_activation kimi-syncd-probe
    check "probe: systemctl start returns only after READY=1" start_waits_for_ready kimi-syncd-probe 2
    check "probe: systemctl kill -s KILL -> restarted" restarts_after_kill kimi-syncd-probe
    check "probe: watchdog stall -> SIGABRT -> restarted" watchdog_restarts
    check "probe: exit 78 -> failed, not restarted, socket kept" config_error_is_not_restarted
    check "probe: reload (SIGHUP -> RELOADING=1, READY=1)" reload_works
    check "probe: LoadCredential=upstream-token optional" optional_credential
    check "probe: group members reach the socket with real credentials" group_access
    check "probe: SIGTERM -> exit 0, socket still listening" stops_cleanly kimi-syncd-probe
    probe_starts=$(get kimi-syncd-probe /v1/health | field starts) || true
}
probe_checks

# The user units, under a lingering user's own manager.
install_user() {
    ct id "$ALICE" >/dev/null 2>&1 || ct useradd -m "$ALICE"
    ct loginctl enable-linger "$ALICE"
    eventually 30 ct systemctl is-active "user@$(ct id -u "$ALICE").service"
    as_alice $IN/src/scripts/install-service.sh --user --find-links $IN/wheels
    as_alice systemctl --user is-active kimi-syncd.socket
    local units=$TREE/home/$ALICE/.config/systemd/user sed_names='s/kimi-syncd\.socket/kimi-syncd-probe.socket/g
s/kimi-syncd\.service/kimi-syncd-probe.service/g
s|%t/kimi-syncd\.sock|%t/kimi-syncd-probe.sock|
s|^ExecStart=.*|ExecStart=%h/.local/share/kimi-syncd/venv/bin/python '"$IN"'/src/tests/system/probe.py|'
    sed "$sed_names" "$ROOT/systemd/user/kimi-syncd.service" >"$units/kimi-syncd-probe.service"
    sed "$sed_names" "$ROOT/systemd/user/kimi-syncd.socket" >"$units/kimi-syncd-probe.socket"
    mkdir -p "$units/kimi-syncd-probe.service.d"
    # ProtectKernelLogs= cannot be set up by a user manager inside nspawn (226/NAMESPACE).
    printf '[Service]\nEnvironment=PROBE_READY_DELAY=2\nProtectKernelLogs=no\n' \
        >"$units/kimi-syncd-probe.service.d/test.conf"
    ct chown -R "$ALICE:" "/home/$ALICE/.config/systemd/user"
    as_alice systemctl --user daemon-reload
    as_alice systemctl --user enable --now kimi-syncd-probe.socket
}
user_state_dir() {
    [ "$(get kimi-syncd-probe /v1/health | field state_directory)" = "/home/$ALICE/.local/state/kimi-syncd" ]
}
MODE=user
check "user: install-service.sh --user, probe units" install_user
check "user probe: lazy socket activation on the first API call" lazy_activation kimi-syncd-probe
check "user probe: systemctl --user start returns only after READY=1" start_waits_for_ready kimi-syncd-probe 2
check "user probe: systemctl --user kill -s KILL -> restarted" restarts_after_kill kimi-syncd-probe
check "user probe: database in ~/.local/state/kimi-syncd" user_state_dir
user_probe_starts=$(get kimi-syncd-probe /v1/health | field starts) || true
MODE=system

# The real daemon, with a test drop-in: a short watchdog (and SIGKILL soon after the
# SIGABRT a SIGSTOPped process cannot act on), and the simulated backend as its upstream,
# started inside the container only after the reboot. Fast reconnects, so the wait is short.
SIM_PORT=18765
SIM_RECORD=/tmp/kimi-syncd-sim.jsonl
N_QUEUED=3
QUEUED_IDS=""
install_daemon_dropin() {
    local drop=$TREE/etc/systemd/system/kimi-syncd.service.d
    mkdir -p "$drop"
    printf '%s\n' '[Service]' 'WatchdogSec=3s' 'TimeoutAbortSec=5s' \
        "Environment=KIMI_SYNCD_UPSTREAM__URL=ws://127.0.0.1:$SIM_PORT/ws" \
        'Environment=KIMI_SYNCD_RECONNECT__MAX_DELAY=1 KIMI_SYNCD_BREAKER__COOLDOWN=2' \
        >"$drop/systest.conf"
    ct systemctl daemon-reload
    prop kimi-syncd.service DropInPaths | grep -q systest.conf
}
outbox_state() { get kimi-syncd "/v1/outbox/$1" | field state; }
daemon_watchdog() {
    local pid restarts since
    get kimi-syncd /v1/health >/dev/null
    is kimi-syncd.service SubState running
    is kimi-syncd.service WatchdogUSec 3s # while running; "infinity" when inactive
    pid=$(prop kimi-syncd.service MainPID) restarts=$(prop kimi-syncd.service NRestarts)
    since=$(ct date '+%Y-%m-%d %H:%M:%S')
    sleep 1 # journalctl --since has a 1 s resolution
    ct systemctl kill -s STOP kimi-syncd.service
    # 3 s without WATCHDOG=1, SIGABRT (+SIGCONT), RestartSec=2s, then READY=1 again.
    eventually 30 is kimi-syncd.service NRestarts $((restarts + 1))
    eventually 20 is kimi-syncd.service SubState running
    [ "$(prop kimi-syncd.service MainPID)" != "$pid" ]
    local journal
    journal=$(ct journalctl -u kimi-syncd --since "$since" --no-pager)
    echo "$journal"
    grep -q 'Watchdog timeout' <<<"$journal"
    grep -q "Failed with result 'watchdog'" <<<"$journal"
    get kimi-syncd /v1/health
}
queue_for_reboot() {
    local n id
    if ct systemctl is-active kimi-syncd-sim.service; then return 1; fi # no backend
    for n in $(seq "$N_QUEUED"); do
        id=$(ct curl -sS --fail --max-time 10 --unix-socket /run/kimi-syncd.sock \
            -H 'Content-Type: application/json' \
            -d "{\"type\":\"memory_compress_preview\",\"requestId\":\"sys-$n\"}" \
            http://kimi/v1/outbox | field id)
        echo "sys-$n: outbox id $id"
        QUEUED_IDS="$QUEUED_IDS $id"
    done
    for id in $QUEUED_IDS; do [ "$(outbox_state "$id")" = queued ]; done
    # A check runs in a subshell: hand the ids back through a file.
    echo "$QUEUED_IDS" >"$WORK/queued-ids"
}
all_delivered() {
    local id
    for id in $QUEUED_IDS; do [ "$(outbox_state "$id")" = delivered ] || return 1; done
}
delivered_after_reboot() {
    local id
    QUEUED_IDS=$(cat "$WORK/queued-ids")
    [ -n "${QUEUED_IDS// /}" ]
    get kimi-syncd /v1/health >/dev/null # the daemon runs (and retries) before the backend
    for id in $QUEUED_IDS; do [ "$(outbox_state "$id")" = queued ]; done
    ct rm -f "$SIM_RECORD"
    ct systemd-run --unit=kimi-syncd-sim --collect /opt/kimi-syncd/bin/python -m kimi_syncd.sim \
        --port "$SIM_PORT" --rate 0 --record "$SIM_RECORD"
    eventually 45 all_delivered
    ct cat "$SIM_RECORD"
    ct cat "$SIM_RECORD" | "$HOST_PY" -c '
import json, sys
want = {"sys-%d" % n for n in range(1, int(sys.argv[1]) + 1)}
got = set()
for line in sys.stdin:
    body = json.loads(json.loads(line)["text"])
    if body.get("type") == "memory_compress_preview":
        got.add(body.get("requestId"))
assert want <= got, (sorted(want - got), sorted(got))' "$N_QUEUED"
    for id in $QUEUED_IDS; do get kimi-syncd "/v1/outbox/$id"; echo; done
    ct systemctl stop kimi-syncd-sim.service
}

DAEMON=0
if ct /opt/kimi-syncd/bin/python -c 'import kimi_syncd.daemon' >/dev/null 2>&1; then
    DAEMON=1
    db_fingerprint() { ct sh -c 'cd /var/lib/private/kimi-syncd && ls -i *.db *.sqlite* 2>/dev/null | sort'; }
    check "kimi-syncd: test drop-in (WatchdogSec=3s, upstream = the in-container sim)" \
        install_daemon_dropin
    check "kimi-syncd: lazy socket activation on the first API call" lazy_activation kimi-syncd
    check "kimi-syncd: systemctl start returns only after READY=1" start_waits_for_ready kimi-syncd 0
    # An accepted outbox message is durable: it survives SIGKILL and, below, a reboot.
    outbox_id=$(ct curl -sS --fail --unix-socket /run/kimi-syncd.sock -H 'Content-Type: application/json' \
        -d '{"type": "system-test", "n": 1}' http://kimi/v1/outbox | field id) || outbox_id=""
    check "kimi-syncd: POST /v1/outbox accepted" test -n "$outbox_id"
    check "kimi-syncd: systemctl kill -s KILL -> restarted" restarts_after_kill kimi-syncd
    check "kimi-syncd: outbox message kept across SIGKILL" \
        ct curl -sS --fail --unix-socket /run/kimi-syncd.sock "http://kimi/v1/outbox/$outbox_id"
    check "kimi-syncd: event loop stalled (SIGSTOP) -> watchdog -> restarted" daemon_watchdog
    # Queued with no backend running: delivered to the sim after the reboot, below.
    check "kimi-syncd: $N_QUEUED messages queued while no backend is up" queue_for_reboot
    check "kimi-syncd: SIGTERM -> exit 0, socket still listening" stops_cleanly kimi-syncd
    daemon_db=$(db_fingerprint) || true
    check "kimi-syncd: database in /var/lib/kimi-syncd" test -n "$daemon_db"
else
    say "skip kimi-syncd daemon checks: kimi_syncd.daemon is not importable yet"
fi

after_reboot_probe() { # STARTS_BEFORE
    get kimi-syncd-probe /v1/health
    [ "$(get kimi-syncd-probe /v1/health | field starts)" -gt "$1" ]
}
after_reboot_daemon() {
    get kimi-syncd /v1/health
    [ "$(db_fingerprint)" = "$daemon_db" ]
    [ "$(get kimi-syncd "/v1/outbox/$outbox_id" | field id)" = "$outbox_id" ]
}
# Not a check(): boot() must run in this shell, which owns the nspawn process.
halt reboot
if boot; then
    PASSED=$((PASSED + 1))
    say "ok   container reboot"
    check "probe: socket listening after reboot, database kept" after_reboot_probe "$probe_starts"
    MODE=user
    check "user probe: socket listening after reboot (linger), database kept" \
        after_reboot_probe "$user_probe_starts"
    MODE=system
    [ "$DAEMON" = 0 ] ||
        check "kimi-syncd: socket listening after reboot, database kept" after_reboot_daemon
    [ "$DAEMON" = 0 ] ||
        check "kimi-syncd: messages queued before the reboot delivered once the backend is up" \
            delivered_after_reboot
else
    FAILED=$((FAILED + 1))
    say "FAIL container reboot (see $WORK/console.log)"
fi

# Last: removal (the probes lose their venv too).
uninstall_user() {
    as_alice $IN/src/scripts/uninstall-service.sh --user
    ct test ! -e "/home/$ALICE/.config/systemd/user/kimi-syncd.service"
    ct test ! -e "/home/$ALICE/.local/share/kimi-syncd/venv"
    ct test -d "/home/$ALICE/.local/state/kimi-syncd" # kept without --purge
    is kimi-syncd.socket LoadState not-found
}
uninstall_system() {
    ct $IN/src/scripts/uninstall-service.sh --purge
    is kimi-syncd.socket LoadState not-found
    ct test ! -e /run/kimi-syncd.sock
    ct test ! -e /opt/kimi-syncd
    ct test ! -e /etc/kimi-syncd
    ct test ! -e /var/lib/private/kimi-syncd
    if ct getent group kimi-syncd-api; then return 1; fi
}
if [ -n "$NSPAWN" ]; then
    MODE=user
    check "user: uninstall-service.sh --user keeps the database" uninstall_user
    MODE=system
    check "uninstall-service.sh --purge removes everything" uninstall_system
fi

echo "system-test: $PASSED passed, $FAILED failed (log: $WORK/checks.log)"
[ "$FAILED" = 0 ]
