"""Check 1: every input file, as ``vm-agent check`` reads them (one problem per file:line:key)."""

from __future__ import annotations

from vm_agent.doctor.context import Context
from vm_agent.doctor.result import CheckResult, fail, ok

CONFIG = "config"


async def check_config(ctx: Context) -> CheckResult:
    config = ctx.config
    paths = config.paths
    # The token's own problems belong to the token line: a valid certificate can make them harmless.
    token_file = str(paths.token)
    problems = [str(p) for p in config.problems if p.file != token_file]
    read = [paths.cluster_env, paths.mesh_config, paths.hosts, paths.root_cert]
    if config.dns.enabled:
        read.append(paths.resolv_conf)
    files = [str(p) for p in read]
    if not problems:
        return ok(CONFIG, f"read without problems: {', '.join(p.name for p in read)}", files=files, problems=[])
    return fail(
        CONFIG,
        f"{len(problems)} problem(s) in the inputs",
        "fix each one where it says (file:line: key); `vm-agent check` prints the effective configuration",
        files=files,
        problems=problems,
    )
