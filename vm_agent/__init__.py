"""vm-agent: joins a VM or bare-metal host to an Istio service mesh."""

__version__ = "0.1.0"

# The istiod release whose wire behaviour vm-agent reproduces; sent as node metadata ISTIO_VERSION,
# which istiod uses to gate features.
ISTIO_COMPAT_VERSION = "1.28.0"
