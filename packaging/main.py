"""vm-agent's entry point in the package, run by /usr/bin/vm-agent with the interpreter it picked.

This interpreter's binary modules (``cp3X/``, e.g. cp313 for Python 3.13) come first on ``sys.path``,
then the files every interpreter shares (``site-packages/``: vm_agent, pure-Python and ``abi3``
dependencies, Envoy).
"""

import os
import sys

_LIB = os.path.dirname(os.path.realpath(__file__))
_ABI = os.path.join(_LIB, f"cp{sys.version_info[0]}{sys.version_info[1]}")
_SHARED = os.path.join(_LIB, "site-packages")
for _needed in (_ABI, os.path.join(_SHARED, "vm_agent")):
    if not os.path.isdir(_needed):
        sys.exit(f"vm-agent: {_needed} is missing: the installation is incomplete (reinstall vm-agent)")
sys.path[0:0] = [_ABI, _SHARED]

from vm_agent.cli import main  # noqa: E402  (needs the path above)

sys.exit(main())
