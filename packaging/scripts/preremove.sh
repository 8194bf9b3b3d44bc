#!/bin/sh
# vm-agent pre-remove (deb prerm / rpm %preun): on removal stop the agent and remove its capture
# rules so nothing of it keeps running or redirecting traffic. An upgrade leaves the agent running
# (the new package's post-install restarts it) and only drops the compiled modules.
#   deb: $1 = remove | upgrade <new-version> | deconfigure | failed-upgrade <old-version>
#   rpm: $1 = 0 on removal, 1 (or more) on upgrade
set -e

# The .pyc files the post-install compiled belong to no package: they go before the package manager
# removes the folders (deb: also before an upgrade unpacks the new sources; rpm runs the old %preun
# after the new %post, so there only on removal).
drop_compiled() {
    if [ -d /usr/lib/vm-agent ]; then
        find /usr/lib/vm-agent -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
    fi
}

case "${1:-}" in
    remove | deconfigure | 0) ;;
    upgrade | failed-upgrade) drop_compiled; exit 0 ;;
    *) exit 0 ;;
esac

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    # Stopping runs the unit's ExecStopPost (netfilter cleanup) as well.
    systemctl stop vm-agent.service || true
    systemctl disable --quiet vm-agent.service 2>/dev/null || true
fi
# Again without systemd's help: the agent may have been started by hand, or the rules left by a
# crashed run. Removing absent rules is a no-op, so this never blocks the uninstall.
if [ -x /usr/bin/vm-agent ]; then
    /usr/bin/vm-agent netfilter cleanup >/dev/null 2>&1 ||
        echo "vm-agent: 'vm-agent netfilter cleanup' failed; check iptables-save / nft list ruleset for leftovers" >&2
fi
drop_compiled
exit 0
