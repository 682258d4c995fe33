"""Which server's verified state recovery uses: tips compared by hash, not only data_version.

Each server's backup, once rebuilt and verified (:class:`cldcb.node.restore.Rebuilt`),
ends on a *tip*: its newest record (or its snapshot, when no record follows)
with its hash, and the set of hashes its chain *replaced*
(:attr:`cldcb.core.seal.ChainVerifier.replaced`: the uncommitted batches a later
record of the same data_version superseded). The rules, in order:

1. A state whose tip hash another server's chain replaced is **superseded**:
   lightningd never committed that batch (it died between the hook and
   COMMIT, and its next start sent a replacement). It is never used, whatever
   its data_version. This is what catches a server that dropped a replacement
   and everything after it: its chain verifies and ends on a batch the node
   never had.
2. Among the others, the highest data_version wins.
3. Two or more distinct tips at that data_version, none replacing another,
   **disagree**: which one lightningd committed cannot be told, so recovery
   refuses (the operator can look with ``recover --list`` and run recovery
   again with only the server they trust). The same tip on several servers
   is one state.

What no comparison can rule out: a tip held by one server alone, if it is a
normal batch, may be one lightningd never committed, whose replacement the
server dropped (or that no other server received): :func:`unconfirmed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cldcb.core.dataversion import Kind, Tip


class Ending(Protocol):
    """What the rules need of a verified state (:class:`cldcb.node.restore.Rebuilt`)."""

    @property
    def data_version(self) -> int: ...

    @property
    def tip(self) -> Tip | None: ...

    @property
    def replaced(self) -> frozenset[bytes]: ...


def tip_hash(state: Ending) -> bytes | None:
    return state.tip.hash if state.tip is not None else None


@dataclass
class Verdict:
    """The outcome of :func:`compare` over some states (indices into its argument)."""

    winners: list[int] = field(default_factory=list)
    """The states at the top, one per distinct tip: one entry unless they disagree."""
    superseded: dict[int, int] = field(default_factory=dict)
    """State -> a state whose chain replaced its tip."""
    same: dict[int, int] = field(default_factory=dict)
    """State -> the winner holding the same tip."""

    @property
    def disagree(self) -> bool:
        return len(self.winners) > 1


def compare(states: Sequence[Ending]) -> Verdict:
    """Apply the rules of the module docstring to ``states``."""
    verdict = Verdict()
    for i, s in enumerate(states):
        h = tip_hash(s)
        by = next((j for j, o in enumerate(states) if j != i and h is not None
                   and h in o.replaced and tip_hash(o) != h), None)
        if by is not None:
            verdict.superseded[i] = by
    live = [i for i in range(len(states)) if i not in verdict.superseded]
    if not live:        # a cycle needs a hash collision; never drop every state
        live = list(range(len(states)))
    top = max((states[i].data_version for i in live), default=-1)
    for i in live:
        if states[i].data_version != top:
            continue
        twin = next((w for w in verdict.winners if tip_hash(states[w]) == tip_hash(states[i])),
                    None)
        if twin is None:
            verdict.winners.append(i)
        else:
            verdict.same[i] = twin
    return verdict


def unconfirmed(used: Ending, others: Sequence[Ending]) -> bool:
    """True if ``used`` ends on a normal batch that no other state ends on too."""
    tip = used.tip
    if tip is None or tip.is_snapshot or tip.kind is not Kind.NORMAL:
        return False
    return not any(tip_hash(o) == tip.hash for o in others)
