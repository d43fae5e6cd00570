#!/usr/bin/env bash
# Install the system programs the tests drive (real clients and servers), only where missing,
# and make sure the local PostgreSQL and Redis are up. Needs root on a Debian machine.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "$2" ]; }
have psql /usr/bin/psql || need+=(postgresql-client)
have pgbench /usr/bin/pgbench || need+=(postgresql-contrib)
have sshd /usr/sbin/sshd || need+=(openssh-server)
have ssh /usr/bin/ssh || need+=(openssh-client)
have pgbouncer /usr/sbin/pgbouncer || need+=(pgbouncer)
have chromium /usr/bin/chromium || need+=(chromium)
have kubectl /usr/bin/kubectl || need+=(kubectl)
have redis-cli /usr/bin/redis-cli || need+=(redis-tools)
have curl /usr/bin/curl || need+=(curl)
have strace /usr/bin/strace || need+=(strace)
# pgjdbc (the PostgreSQL JDBC driver) and a JDK, to compile and run tests/drivers/PgJdbc.java.
[ -f /usr/share/java/postgresql.jar ] || need+=(libpostgresql-jdbc-java)
have javac /usr/bin/javac || need+=(default-jdk-headless)
# node and npm: the tests install node-postgres with npm themselves (into .venv/node-pg).
have npm /usr/bin/npm || need+=(nodejs npm)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# PL/Python for the server's version: the tests prove an agent cannot run it under a trusted language's name.
for dir in /usr/lib/postgresql/*/; do
    if [ -x "${dir}bin/postgres" ] && [ ! -f "${dir}lib/plpython3.so" ]; then
        need+=("postgresql-plpython3-$(basename "$dir")")
    fi
done
# `ensure-system.sh bench`: also the load generator of bench/bench_http.py (it falls back to a
# Python client without it, which takes CPU from the proxies it measures).
if [ "${1:-}" = bench ]; then have wrk /usr/bin/wrk || need+=(wrk); fi

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing system packages: ${need[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "installing system packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The machine starts PostgreSQL and Redis before a session; start them if they are down.
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi
