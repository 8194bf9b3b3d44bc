#!/bin/sh
# vm-agent pre-remove (deb prerm / rpm %preun): on removal stop the agent and remove its capture
# rules so nothing of it keeps running or redirecting traffic. An upgrade does nothing here: the
# new package's post-install restarts a running agent.
#   deb: $1 = remove | upgrade <new-version> | deconfigure | failed-upgrade <old-version>
#   rpm: $1 = 0 on removal, 1 (or more) on upgrade
set -e

case "${1:-}" in
    remove | deconfigure | 0) ;;
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
exit 0
