"""The network lab: the real control plane and real VMs (vm-agent + Envoy + an app), each in a network namespace."""
