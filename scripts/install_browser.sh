#!/usr/bin/env sh
# Install Debian's chromium for the browser test (tests/test_web_page.py), if missing.
#
# Idempotent: does nothing when /usr/bin/chromium already exists. Never fails the
# caller: where apt is unavailable (not Debian, no root, no network) it prints why and
# exits 0, and the browser test then skips with a clear message.
set -u

CHROMIUM=${CBIR_CHROMIUM:-/usr/bin/chromium}

if [ -x "$CHROMIUM" ]; then
    echo "install_browser: $CHROMIUM already present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found; the browser test will be skipped"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install_browser: not root and no password-less sudo; the browser test will be skipped"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq; then
    echo "install_browser: apt-get update failed; the browser test will be skipped"
    exit 0
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; then
    echo "install_browser: installing chromium failed; the browser test will be skipped"
    exit 0
fi
echo "install_browser: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
exit 0
