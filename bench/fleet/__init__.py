"""The fleet simulator: N VMs running the agent's own identity, xDS and health code against the real control
plane of the interop lab (tests/interop/lab.py), without Envoy. See run.py; results in bench/results/fleet.md."""
