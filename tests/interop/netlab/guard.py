"""Runs one lab process as another user and makes sure it dies with the test run.

``setpriv --pdeathsig`` is cleared by the kernel when a process changes its user, so it cannot cover a process
that drops root. This guard keeps root (and the parent-death signal setpriv gave it), starts the command as the
requested user with its own parent-death signal set *after* the switch, and forwards TERM/INT/HUP to it, so a
test's SIGTERM reaches the agent exactly as systemd's would.

    python guard.py --uid 1337 --gid 1337 [--env K=V ...] -- argv...
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_guard() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--cwd", default="/")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("argv", nargs=argparse.REMAINDER)
    ns = p.parse_args()
    argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    env.update(dict(item.split("=", 1) for item in ns.env))
    child = subprocess.Popen(
        argv, user=ns.uid, group=ns.gid, extra_groups=[], cwd=ns.cwd, env=env, preexec_fn=_die_with_guard
    )
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:
            continue
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
