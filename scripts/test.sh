#!/bin/sh
# Install what the tests need (Debian packages for the real SMTP client and
# the independent DKIM verifier, Python packages into ./.venv) and run them.
set -eu
cd "$(dirname "$0")/.."
need=""
command -v swaks >/dev/null || need="$need swaks"
command -v opendkim >/dev/null || need="$need opendkim"
command -v opendkim-genkey >/dev/null || need="$need opendkim-tools"
command -v jq >/dev/null || need="$need jq"
command -v curl >/dev/null || need="$need curl"
command -v openssl >/dev/null || need="$need openssl"
command -v faketime >/dev/null || need="$need faketime"
command -v fail2ban-regex >/dev/null || need="$need fail2ban"
if [ -n "$need" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $need
fi
scripts/venv.sh test
# two worker processes (-n 0 for one): most of the suite's time is real
# relays starting and waiting, which two at a time halves
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
