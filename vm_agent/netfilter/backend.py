"""Installing, showing and removing the capture rules: the only part of netfilter that runs commands.

Both backends are transactional: iptables-restore commits a whole table at once, and ``nft -f``
commits a whole script at once, so a half-applied capture (DNS redirected, but the agent's own
queries not yet exempt) can never be observed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from vm_agent.logs import get_logger
from vm_agent.metrics import REGISTRY, Counter
from vm_agent.netfilter.render import (
    BACKENDS,
    CHAIN_PREFIX,
    NFT_FAMILY,
    NFT_TABLE,
    RuleTable,
    iptables_tables,
    render_nft,
)
from vm_agent.netfilter.settings import CaptureSettings

log = get_logger("netfilter")

OPERATIONS = Counter(
    "vm_agent_netfilter_operations",
    "Capture rule operations by action (apply, cleanup, repair), backend and result (ok, error).",
    ["action", "backend", "result"],
    registry=REGISTRY,
)

_COMMAND_TIMEOUT = 30.0
IPV6_PROBE_SOURCE = "::6/128"
_NFT_TABLE_REF = f"{NFT_FAMILY} {NFT_TABLE}"


class NetfilterError(RuntimeError):
    """A netfilter command failed; the message names the command, its exit code and its stderr."""


def _argv(argv: Sequence[str], netns: str | None) -> list[str]:
    # ``netns`` exists for tests and for operators debugging a namespace; the agent passes None.
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def _run(argv: Sequence[str], netns: str | None, stdin: str | None = None) -> str:
    full = _argv(argv, netns)
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        raise NetfilterError(f"`{full[0]}` not found: install it (Debian: apt-get install iptables nftables)") from None
    except subprocess.TimeoutExpired:
        raise NetfilterError(f"`{shlex.join(full)}` did not finish within {_COMMAND_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        raise NetfilterError(_describe_failure(full, proc.returncode, proc.stderr, stdin))
    return proc.stdout


def _describe_failure(argv: Sequence[str], code: int, stderr: str, stdin: str | None) -> str:
    message = f"`{shlex.join(argv)}` failed with exit code {code}: {stderr.strip() or '(no stderr)'}"
    # Both restore tools and nft report the input line; quoting it saves the operator a search.
    match = re.search(r"line:? ?(\d+)", stderr) or re.search(r":(\d+):\d+", stderr)
    if stdin and match:
        lines = stdin.splitlines()
        index = int(match.group(1)) - 1
        if 0 <= index < len(lines):
            message += f"\n  input line {index + 1}: {lines[index]}"
    return message


def _works(argv: Sequence[str], netns: str | None) -> bool:
    if shutil.which(argv[0]) is None:
        return False
    try:
        _run(argv, netns)
    except NetfilterError:
        return False
    return True


def detect_backend(*, netns: str | None = None) -> str:
    """``nft`` if the nft binary can list the ruleset here, else ``iptables``."""
    if _works(["nft", "list", "tables"], netns):
        return "nft"
    return "iptables"


def _resolve(backend: str, netns: str | None) -> str:
    if backend == "auto":
        return detect_backend(netns=netns)
    if backend not in BACKENDS:
        raise ValueError(f"netfilter backend: {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    return backend


# --------------------------------------------------------------------------------------------- iptables


@dataclass
class _SavedTable:
    chains: list[str] = field(default_factory=list)  # chains we own that exist
    jumps: list[str] = field(default_factory=list)  # rules in other chains that jump into ours
    rules: list[str] = field(default_factory=list)  # rules inside our chains

    def __bool__(self) -> bool:
        return bool(self.chains or self.jumps)


def _owned(name: str) -> bool:
    return name.startswith(CHAIN_PREFIX)


def parse_iptables_save(text: str) -> dict[str, _SavedTable]:
    """Our chains, jumps into them and their rules, per table, from ``iptables-save`` output."""
    tables: dict[str, _SavedTable] = {}
    current: _SavedTable | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), _SavedTable())
        elif current is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if _owned(name):
                current.chains.append(name)
        elif line.startswith("-A "):
            words = shlex.split(line)
            chain = words[1]
            target = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "-g")), "")
            if _owned(chain):
                current.rules.append(line)
            elif _owned(target):
                current.jumps.append(line)
    return {name: table for name, table in tables.items() if table}


def _iptables_cmds(version: int) -> tuple[str, str]:
    return ("iptables-save", "iptables-restore") if version == 4 else ("ip6tables-save", "ip6tables-restore")


def _reconcile_text(current: dict[str, _SavedTable], desired: dict[str, RuleTable]) -> str:
    """Restore input turning ``current`` into ``desired`` in one commit per table.

    Declaring a chain under --noflush empties it, so re-applying never duplicates rules inside our
    chains; jumps from built-in chains are deleted by their exact saved text and re-added, which
    keeps exactly one copy and leaves every rule that is not ours in place.
    """
    out: list[str] = []
    for name in [*desired, *(t for t in current if t not in desired)]:
        want = desired.get(name)
        have = current.get(name, _SavedTable())
        want_chains = want.chains if want else []
        stale = [c for c in have.chains if c not in want_chains]
        out.append(f"*{name}")
        out.extend(f":{chain} - [0:0]" for chain in [*want_chains, *stale])
        out.extend("-D" + jump[2:] for jump in have.jumps)
        out.extend(f"-X {chain}" for chain in stale)
        if want:
            out.extend(want.rules)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def _iptables_state(version: int, netns: str | None) -> dict[str, _SavedTable]:
    save, _ = _iptables_cmds(version)
    return parse_iptables_save(_run([save], netns))


def _iptables_apply(settings: CaptureSettings | None, dry_run: bool, netns: str | None) -> str:
    """Apply ``settings`` (None = remove everything ours) for IPv4 and IPv6; returns the inputs used."""
    texts: list[str] = []
    for version in (4, 6):
        desired = iptables_tables(settings, version) if settings else {}
        save, restore = _iptables_cmds(version)
        try:
            current = _iptables_state(version, netns)
        except NetfilterError as err:
            if not desired:
                # Nothing to install and the family cannot be read (no ip6tables, no IPv6
                # kernel, not root for a dry run): there is nothing of ours there either.
                log.debug("skipping %s: %s", save, err)
                continue
            if not dry_run:
                raise
            current = {}
        text = _reconcile_text(current, desired)
        if not text:
            continue
        if not dry_run:
            _run([restore, "--noflush"], netns, stdin=text)
        texts.append(f"# {restore} --noflush (IPv{version})\n{text}")
    return "".join(texts)


def _iptables_show(netns: str | None) -> str:
    texts: list[str] = []
    for version in (4, 6):
        try:
            tables = _iptables_state(version, netns)
        except NetfilterError:
            continue
        if not tables:
            continue
        lines = [f"# {_iptables_cmds(version)[0]} (IPv{version}), chains owned by vm-agent"]
        for name, table in tables.items():
            lines.append(f"*{name}")
            lines.extend(f":{chain} - [0:0]" for chain in table.chains)
            lines.extend(table.jumps)
            lines.extend(table.rules)
            lines.append("COMMIT")
        texts.append("\n".join(lines) + "\n")
    return "".join(texts)


# --------------------------------------------------------------------------------------------- nft

# ``add`` creates the table if it is missing so that ``delete`` cannot fail; both run in the same
# transaction as the new definition, so the old table is replaced atomically (nft 1.0.6 has no
# ``destroy``).
_NFT_DROP = f"add table {_NFT_TABLE_REF}\ndelete table {_NFT_TABLE_REF}\n"


def _nft_apply(settings: CaptureSettings | None, dry_run: bool, netns: str | None) -> str:
    if settings is None:
        if not dry_run and not _nft_table_exists(netns):
            return ""
        script = _NFT_DROP
    else:
        script = _NFT_DROP + render_nft(settings)
    if not dry_run:
        _run(["nft", "-f", "-"], netns, stdin=script)
    return script


def _nft_table_exists(netns: str | None) -> bool:
    return _works(["nft", "list", "table", *_NFT_TABLE_REF.split()], netns)


def _nft_show(netns: str | None) -> str:
    if shutil.which("nft") is None:
        return ""
    try:
        return _run(["nft", "list", "table", *_NFT_TABLE_REF.split()], netns)
    except NetfilterError:
        return ""


# --------------------------------------------------------------------------------------------- API


def apply(settings: CaptureSettings, backend: str = "auto", dry_run: bool = False, *, netns: str | None = None) -> str:
    """Install the capture rules (replacing any previous copy); returns what was (or would be) applied.

    Rules of ours left by the other backend are removed too, so switching backends never leaves
    two captures stacked on each other.
    """
    settings.validate()
    chosen = _resolve(backend, netns)
    try:
        if chosen == "nft":
            text = _nft_apply(settings, dry_run, netns)
            if not dry_run and _have_iptables(netns):
                _iptables_apply(None, False, netns)
        else:
            text = _iptables_apply(settings, dry_run, netns)
            if not dry_run and _works(["nft", "list", "tables"], netns):
                _nft_apply(None, False, netns)
        if settings.ipv6 and not dry_run:
            # IPv6 lo holds only ::1 (/128), so probes and Envoy's inbound passthrough could not
            # bind the ::6 source the rules exempt; istio-iptables adds it the same way.
            _run(["ip", "-6", "addr", "replace", IPV6_PROBE_SOURCE, "dev", "lo"], netns)
    except NetfilterError:
        OPERATIONS.labels("apply", chosen, "error").inc()
        raise
    if not dry_run:
        OPERATIONS.labels("apply", chosen, "ok").inc()
        log.info("capture rules applied with %s (dns capture %s)", chosen, "on" if settings.redirect_dns else "off")
    return text


def verify(settings: CaptureSettings, backend: str, *, netns: str | None = None) -> str | None:
    """None when what is installed has the shape ``settings`` renders to, else what differs.

    The shape is the chains and the number of rules in each (plus the jumps into them): both
    tools print rules normalised (``-m tcp``, sorted sets), so comparing text would report drift
    that is not there, while a flushed chain, a deleted table or a firewall reload is caught.
    """
    if backend == "nft":
        listed = _nft_show(netns)
        if not listed:
            return f"table {_NFT_TABLE_REF} is missing"
        want, have = _nft_shape(render_nft(settings)), _nft_shape(listed)
        return None if want == have else f"table {_NFT_TABLE_REF} differs: expected {want}, found {have}"
    for version in (4, 6):
        desired = iptables_tables(settings, version)
        try:
            current = _iptables_state(version, netns)
        except NetfilterError as err:
            if desired:
                return str(err)
            continue
        want_shape = {name: _table_shape(t.chains, t.rules) for name, t in desired.items()}
        have_shape = {name: _table_shape(t.chains, t.jumps + t.rules) for name, t in current.items()}
        if want_shape != have_shape:
            return f"IPv{version} chains differ: expected {want_shape}, found {have_shape}"
    return None


def _table_shape(chains: Sequence[str], rules: Sequence[str]) -> dict[str, int]:
    shape = dict.fromkeys(chains, 0)
    for rule in rules:
        words = rule.split()
        chain = words[1]
        if not _owned(chain):
            chain = f"{chain}->{next(w for w in reversed(words) if _owned(w))}"
        shape[chain] = shape.get(chain, 0) + 1
    return shape


def _nft_shape(text: str) -> dict[str, int]:
    shape: dict[str, int] = {}
    chain = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("chain ") and line.endswith("{"):
            chain = line.split()[1]
            shape[chain] = 0
        elif line == "}":
            chain = ""
        elif chain and line and not line.startswith(("type ", "policy ")):
            shape[chain] += 1
    return shape


def _have_iptables(netns: str | None) -> bool:
    return shutil.which("iptables-save") is not None and shutil.which("iptables-restore") is not None


def cleanup(backend: str = "auto", dry_run: bool = False, *, netns: str | None = None) -> str:
    """Remove every chain, jump and table of ours (``auto``: from both backends); returns what was run."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"netfilter backend: {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    texts: list[str] = []
    try:
        nft_usable = shutil.which("nft") is not None and (backend == "nft" or _works(["nft", "list", "tables"], netns))
        if backend in ("auto", "nft") and nft_usable:
            texts.append(_nft_apply(None, dry_run, netns))
        if backend in ("auto", "iptables") and _have_iptables(netns):
            texts.append(_iptables_apply(None, dry_run, netns))
    except NetfilterError:
        OPERATIONS.labels("cleanup", backend, "error").inc()
        raise
    if not dry_run:
        OPERATIONS.labels("cleanup", backend, "ok").inc()
        log.info("capture rules removed (%s)", backend)
    return "".join(texts)


def show(backend: str = "auto", *, netns: str | None = None) -> str:
    """What of ours is installed now (``auto``: both backends); empty when nothing is."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"netfilter backend: {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    texts: list[str] = []
    if backend in ("auto", "nft"):
        nft = _nft_show(netns)
        if nft:
            texts.append(f"# nft list table {_NFT_TABLE_REF}\n{nft}")
    if backend in ("auto", "iptables"):
        texts.append(_iptables_show(netns))
    return "".join(texts)


def run_command(
    action: str, settings: CaptureSettings, backend: str = "auto", dry_run: bool = False, *, netns: str | None = None
) -> int:
    """``vm-agent netfilter apply|cleanup|show [--dry-run]``: prints the rules, returns the exit code."""
    try:
        if action == "apply":
            text = apply(settings, backend, dry_run, netns=netns)
            verb = "would apply" if dry_run else "applied"
        elif action == "cleanup":
            text = cleanup(backend, dry_run, netns=netns)
            verb = "would run" if dry_run else "removed with"
        elif action == "show":
            text = show(backend, netns=netns)
            verb = "installed"
        else:
            print(f"vm-agent netfilter: unknown action {action!r} (expected apply, cleanup or show)", file=sys.stderr)
            return 2
    except (NetfilterError, ValueError) as err:
        print(f"vm-agent netfilter {action}: {err}", file=sys.stderr)
        return 1
    if text:
        print(f"# {verb}:")
        print(text, end="")
    else:
        print("# no vm-agent capture rules installed" if action != "apply" else "# nothing to apply")
    return 0
