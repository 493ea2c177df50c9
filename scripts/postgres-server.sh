#!/usr/bin/env bash
# A throwaway PostgreSQL server on this machine's loopback, for the tests (tests/unit/test_sweep_storage.py), the load
# benchmark (benchmarks/bench_sweep_storage.py) and trying `kdpipe sweep --storage postgresql://...` by hand.
#
#   scripts/postgres-server.sh install     apt-get install postgresql where its binaries are missing (Debian, as root)
#   scripts/postgres-server.sh start DIR   a new server with its data in DIR (created), or DIR's server again after
#                                          `stop`; prints its URL, postgresql://kdpipe:PASSWORD@127.0.0.1:PORT/kdpipe
#   scripts/postgres-server.sh url DIR     prints that URL again
#   scripts/postgres-server.sh stop DIR    stops it (fast shutdown: open sessions are cut, committed data stays)
#
# It listens on 127.0.0.1 at a free port (kept in DIR/port) and on a socket in DIR; the password is random (DIR/password).
# PostgreSQL refuses to run as root: as root (CI, this image) the server runs as the user `postgres`, which Debian's
# package creates, and DIR belongs to it. Every failure is one line on stderr and exit status 1.
set -euo pipefail

fail() { echo "postgres-server.sh: $*" >&2; exit 1; }

bindir() {  # the server's programs: on PATH, else Debian's versioned folder (the newest)
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"; return  # Debian links some of them into /usr/local/bin
    fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$found" ] && [ -x "$found/pg_ctl" ] || fail "no PostgreSQL server programs (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; install them: $0 install (apt-get install postgresql)"
    echo "$found"
}

as_server() {  # run a server program as an unprivileged user
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || fail "running as root and there is no user 'postgres' to run the server as (PostgreSQL refuses root); apt-get install postgresql creates it"
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

url() { echo "postgresql://kdpipe:$(cat "$1/password")@127.0.0.1:$(cat "$1/port")/kdpipe"; }

start() {
    local dir=$1 bin
    bin=$(bindir)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ "$(id -u)" = 0 ] && { as_server true; chown postgres "$dir"; }
    chmod 700 "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        python3 -c 'import secrets; print(secrets.token_hex(12))' > "$dir/password"
        free_port > "$dir/port"
        [ "$(id -u)" = 0 ] && chown postgres "$dir/password" "$dir/port"
        as_server "$bin/initdb" -D "$dir/data" -U kdpipe --pwfile="$dir/password" --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 >"$dir/initdb.log" 2>&1 \
            || fail "initdb failed in $dir/data: $(tail -n 1 "$dir/initdb.log")"
    fi
    as_server "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $(cat "$dir/port") -k $dir -c listen_addresses=127.0.0.1" start >/dev/null \
        || fail "the server in $dir did not start: $(tail -n 1 "$dir/server.log" 2>/dev/null)"
    if [ ! -f "$dir/created" ]; then
        as_server "$bin/createdb" -h "$dir" -p "$(cat "$dir/port")" -U kdpipe kdpipe \
            || fail "createdb kdpipe failed on the server in $dir"
        touch "$dir/created"
    fi
    url "$dir"
}

stop() {
    local dir=$1
    [ -f "$dir/data/PG_VERSION" ] || fail "$dir holds no server started by $0"
    as_server "$(bindir)/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
}

case "${1:-}" in
    install)
        [ -n "$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null)" ] && exit 0
        [ "$(id -u)" = 0 ] || fail "install needs root (apt-get install postgresql)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null ;;
    start) [ -n "${2:-}" ] || fail "usage: $0 start DIR"; start "$2" ;;
    url) [ -f "${2:-}/port" ] || fail "usage: $0 url DIR (a folder given to start)"; url "$2" ;;
    stop) [ -n "${2:-}" ] || fail "usage: $0 stop DIR"; stop "$2" ;;
    *) fail "usage: $0 install | start DIR | url DIR | stop DIR" ;;
esac
