#!/usr/bin/env bash
# Install the system packages the test suite needs, when they are missing (Debian/Ubuntu, root).
# Idempotent and quick when everything is present. Never starts a distribution service: the
# tests run their own throwaway servers (see tests/postgres.py).
set -euo pipefail

# One entry per package: "<debian package>:<shell test that succeeds when it is installed>".
# Add postfix, gpg, ... here.
PACKAGES=(
    "postgresql:compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null"
    "gnupg:command -v gpg >/dev/null"
    # The MTA in front of the bridge (tests/test_postfix.py runs a throwaway instance of it).
    "postfix:command -v postfix >/dev/null || test -x /usr/sbin/postfix"
)

missing=()
for entry in "${PACKAGES[@]}"; do
    pkg=${entry%%:*}
    check=${entry#*:}
    if ! eval "$check"; then
        missing+=("$pkg")
    fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ ${EUID:-$(id -u)} -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: cannot install ${missing[*]} (needs root and apt-get);" \
        "PostgreSQL tests will be skipped unless TEST_POSTGRES_URI is set, Postfix tests skipped"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the package's maintainer scripts from starting (or creating a running) cluster service.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

# Postfix asks which kind of mail system to set up: none. The package then writes no main.cf
# and configures no service; the tests give each instance its own configuration directory.
if command -v debconf-set-selections >/dev/null 2>&1; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
fi

echo "system-deps: installing ${missing[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
