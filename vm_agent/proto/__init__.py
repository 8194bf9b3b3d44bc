"""Istio's own wire messages (CA service, NDS NameTable, WorkloadGroup probe, status).

The ``*_pb2`` modules are generated from the ``.proto`` files beside this file by
grpcio-tools at build time (``setup.py`` build hook, ``make proto``); they are not
committed.  Envoy's messages come from the ``xds-protos`` distribution.
"""

HEALTH_INFO_TYPE_URL = "type.googleapis.com/istio.v1.HealthInformation"
NAME_TABLE_TYPE_URL = "type.googleapis.com/istio.networking.nds.v1.NameTable"
PROXY_CONFIG_TYPE_URL = "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"
CA_CREATE_CERTIFICATE_PATH = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
