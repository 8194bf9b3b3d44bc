"""Workload identity: key + CSR, the CA client, rotation and persistence, and the SDS server for Envoy."""
