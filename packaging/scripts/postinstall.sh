#!/bin/sh
# vm-agent post-install (deb postinst / rpm %post). POSIX sh, safe to run again, and works in a
# root without a running systemd (chroot, container image build).
#   deb: $1 = configure [old-version] | abort-upgrade | abort-remove | abort-deconfigure
#   rpm: $1 = 1 on install, 2 (or more) on upgrade
set -e
umask 022

upgrade=no
case "${1:-}" in
    configure) [ -z "${2:-}" ] || upgrade=yes ;;
    [2-9]) upgrade=yes ;;
esac

# The same proxy user istio-sidecar creates: capture rules exempt its traffic by uid/gid.
if ! getent group istio-proxy >/dev/null 2>&1; then
    if command -v groupadd >/dev/null 2>&1; then
        groupadd --system istio-proxy
    else
        addgroup --system istio-proxy
    fi
fi
if ! getent passwd istio-proxy >/dev/null 2>&1; then
    shell=/bin/false
    for candidate in /usr/sbin/nologin /sbin/nologin; do
        if [ -x "$candidate" ]; then shell=$candidate; break; fi
    done
    if command -v useradd >/dev/null 2>&1; then
        useradd --system --gid istio-proxy --home-dir /var/lib/istio --no-create-home \
            --shell "$shell" --comment "Istio proxy (vm-agent)" istio-proxy
    else
        adduser --system --ingroup istio-proxy --home /var/lib/istio --no-create-home \
            --shell "$shell" istio-proxy
    fi
fi

# The folders the Istio VM guide copies istioctl's files into; /etc/istio is the usual alias of
# /var/lib/istio, but an existing /etc/istio (file, folder or link) is the admin's and stays.
mkdir -p /var/lib/istio/envoy /var/lib/istio/config /var/lib/istio/proxy /etc/certs
if [ ! -e /etc/istio ] && [ ! -L /etc/istio ]; then
    ln -s /var/lib/istio /etc/istio
fi
# The unit's ReadWritePaths= refuses to start when one of them is missing.
mkdir -p /etc/istio/proxy /etc/istio/config
if command -v systemd-tmpfiles >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemd-tmpfiles --create vm-agent.conf || mkdir -p /var/run/secrets
else
    mkdir -p /var/run/secrets
fi
# Only the folders themselves: files the admin put inside keep their owners.
chown istio-proxy:istio-proxy /etc/certs /var/lib/istio/envoy /var/lib/istio/config \
    /var/lib/istio/proxy /etc/istio/proxy /etc/istio/config /var/run/secrets

# Byte-compile the modules for every supported interpreter on this machine, like Debian's py3compile:
# the package ships sources only (one .pyc set per Python version would multiply its size), and the
# unit's read-only /usr would otherwise make Python compile everything in memory at every start.
# Hash-checked .pyc files stay valid whatever mtimes the package manager gave the sources.
# Stale ones go first: after an rpm upgrade nothing else removes them, and the folders the new
# version dropped must empty out.
lib=/usr/lib/vm-agent
find "$lib" -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
for abi in "$lib"/cp3*; do
    [ -d "$abi" ] || continue
    python=$(command -v "python3.${abi##*/cp3}" 2>/dev/null) || continue
    "$python" -m compileall -q -j 0 --invalidation-mode checked-hash "$lib/site-packages" "$abi" "$lib/main.py" \
        >/dev/null 2>&1 || echo "vm-agent: byte-compiling for $python failed; the agent still runs (slower start)" >&2
done

# Like istio-sidecar, the unit is never enabled or started by the package; an upgrade restarts it
# only if it was running, so the new code takes over.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
    if [ "$upgrade" = yes ]; then
        systemctl try-restart vm-agent.service || echo "vm-agent: restart after upgrade failed: see 'systemctl status vm-agent'" >&2
    fi
fi
exit 0
