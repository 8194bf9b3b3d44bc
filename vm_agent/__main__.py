"""``python -m vm_agent`` runs the command line."""

from vm_agent.cli import main

raise SystemExit(main())
