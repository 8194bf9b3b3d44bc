"""The DNS proxy: answers mesh names from the NameTable, forwards the rest to the host's resolvers.

``DnsServer(DnsSettings(...))`` is the service; ``index.build_index`` and ``handler.handle`` are the
pure parts (NameTable → precomputed answers, packet → decision) the servers are built on.
"""

from vm_agent.dns.server import DnsServer, DnsSettings, default_listen

__all__ = ["DnsServer", "DnsSettings", "default_listen"]
