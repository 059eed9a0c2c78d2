#!/usr/bin/env bash
# Installs snapvisor as a systemd service: builds the release binary, copies it and the unit,
# and enables the service. Run as root from a checkout. Usage: deploy/install.sh [--no-start]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
cargo build --release --locked --bin snapvisor
install -m 0755 target/release/snapvisor /usr/local/bin/snapvisor
install -d /usr/local/share/doc/snapvisor
install -m 0644 README.md /usr/local/share/doc/snapvisor/README.md
install -m 0644 deploy/snapvisor.service /etc/systemd/system/snapvisor.service
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "${1:-}" != "--no-start" ]; then
        systemctl enable --now snapvisor.service
        systemctl --no-pager status snapvisor.service | head -5
    fi
else
    echo "install: systemd is not running here; installed the unit without starting it" >&2
fi
