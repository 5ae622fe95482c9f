#!/usr/bin/env bash
# Makes sure the services the tests talk to are answering: Mosquitto on
# 127.0.0.1:1883 and PostgreSQL on 127.0.0.1:5432. Starts them when they are
# installed but down; says what is missing otherwise (tests that need a missing
# service are skipped with that reason). On x86-64 it also makes sure
# qemu-x86_64 is there, for the test that runs the ONNX int8/int4 checks on
# the AVX2 kernels of a CPU without VNNI (tests/onnx/test_onnx_haswell.py), and
# that Debian's chromium and chromium-driver are there for the console's browser
# tests (tests/fleet/test_console_browser.py; no browser is downloaded otherwise).
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

if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing qemu-user (qemu-x86_64 -cpu Haswell runs the AVX2 kernel test)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q qemu-user >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q qemu-user >/dev/null 2>&1; } \
            || echo "==> could not install qemu-user: the AVX2 kernel test will be skipped" >&2
    else
        echo "==> qemu-x86_64 is not installed (as root: apt-get install qemu-user):" \
             "the AVX2 kernel test will be skipped" >&2
    fi
fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing chromium and chromium-driver (the console's browser tests)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
            || echo "==> could not install chromium: the console's browser tests will be skipped" >&2
    else
        echo "==> chromium/chromedriver are not installed (as root: apt-get install chromium" \
             "chromium-driver): the console's browser tests will be skipped" >&2
    fi
fi
true
