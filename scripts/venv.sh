#!/bin/sh
# Create ./.venv and install the relay into it (with the test tools when
# called with "test"). Debian's system Python needs python3-venv for this.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}
version='import sys; print("%d.%d" % sys.version_info[:2])'
wanted=$("$PYTHON" -c "$version")
# one made by another Python (PYTHON=python3.12, or a Debian upgrade's new
# python3) would be kept, and its interpreter used, without a word
had=$(.venv/bin/python -c "$version" 2>/dev/null || true)
if { [ -e .venv ] || [ -L .venv ]; } && [ "$had" != "$wanted" ]; then
    if [ -n "$had" ]; then
        echo "./.venv runs Python $had, not $PYTHON's $wanted: making it again" >&2
    else
        echo "./.venv is not a virtualenv whose Python starts: making it again with $PYTHON" >&2
    fi
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            "$PYTHON" -m venv .venv
        else
            echo "cannot create a virtualenv: install python3-venv (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi
stamp=.venv/.installed${extras:+-$extras}
# the test install holds the plain one: make run after make test needs no pip
if [ -z "$extras" ] && [ -f .venv/.installed-test ] && [ ! pyproject.toml -nt .venv/.installed-test ]; then
    stamp=.venv/.installed-test
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
    touch "$stamp"
fi
