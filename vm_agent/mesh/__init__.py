"""The built-in local mesh: a control plane that behaves like istiod towards a VM."""

from vm_agent.mesh.server import MeshServer
from vm_agent.mesh.settings import MeshSettings

__all__ = ["MeshServer", "MeshSettings"]
