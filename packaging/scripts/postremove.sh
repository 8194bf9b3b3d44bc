#!/bin/sh
# vm-agent post-remove (deb postrm / rpm %postun). The istio-proxy user, /var/lib/istio and
# /etc/certs stay: they hold the admin's mesh files and may be shared with istio-sidecar.
#   deb: $1 = remove | purge | upgrade | failed-upgrade | abort-install | abort-upgrade | disappear
#   rpm: $1 = 0 on removal, 1 (or more) on upgrade
set -e

case "${1:-}" in
    remove | purge | 0) ;;
    *) exit 0 ;;
esac

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
fi
# Purge also drops what only the agent wrote: its key, certificates and state.
if [ "$1" = purge ]; then
    rm -rf /var/lib/vm-agent
fi
exit 0
