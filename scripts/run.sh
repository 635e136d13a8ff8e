#!/bin/sh
# Install the relay into ./.venv, create a development DKIM key if there is
# none, and serve the example policy (127.0.0.1:2525, mail lands in ./outbox/).
set -eu
cd "$(dirname "$0")/.."
scripts/venv.sh
if [ ! -f dkim/platform.example.dev.private ]; then
    mkdir -p dkim
    .venv/bin/relay dkim keygen --domain platform.example --selector dev --directory dkim \
        > dkim/platform.example.dev.txt
    echo "development DKIM key created; its DNS record is in dkim/platform.example.dev.txt" >&2
fi
# The example holds logins: a checkout leaves it readable by every user,
# which the relay warns of at every start. Another policy is the sysadmin's.
if [ -z "${RELAY_CONFIG:-}" ]; then
    chmod o-rwx config/relay.example.yaml || true
fi
exec .venv/bin/relay serve -c "${RELAY_CONFIG:-config/relay.example.yaml}"
