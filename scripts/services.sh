#!/usr/bin/env bash
# Makes sure the services the tests talk to are answering: Mosquitto on
# 127.0.0.1:1883 and PostgreSQL on 127.0.0.1:5432. Starts them when they are
# installed but down; says what is missing otherwise (tests that need a missing
# service are skipped with that reason).
set -uo pipefail

answering() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! answering 1883; then
    if command -v mosquitto >/dev/null; then
        echo "==> starting mosquitto on 1883"
        mosquitto -d -c /etc/mosquitto/mosquitto.conf 2>/dev/null || mosquitto -d -p 1883
        for _ in $(seq 50); do answering 1883 && break; sleep 0.1; done
    else
        echo "==> mosquitto is not installed: MQTT tests will be skipped" >&2
    fi
fi

if ! answering 5432; then
    if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null; then
        echo "==> starting PostgreSQL on 5432"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
        for _ in $(seq 100); do answering 5432 && break; sleep 0.1; done
    else
        echo "==> PostgreSQL is not installed: PostgreSQL tests will be skipped" >&2
    fi
fi
true
