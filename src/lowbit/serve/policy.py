"""Which sub-net serves the next batch, and how large the batch is.

SuperServe's SlackFit (seed 002's survey: a scheduler that picks, per batch, among the operating
points of a weight-shared supernet under unpredictable load). With ``n`` requests queued, the
oldest of which has ``slack`` milliseconds left before its deadline, and ``lat(s, b)`` the
profiled latency of sub-net ``s`` at batch ``b``::

    for b = min(n, max_batch) down to 1:
        s* = the most accurate sub-net s in C with lat(s, b) <= slack
        if s* exists: serve the b oldest requests with s*
    otherwise the oldest request cannot meet its deadline: shed it (503) and decide again

Taking the largest batch first keeps throughput up when the queue grows; the accuracy then falls
only as far as the slack forces it. The policies differ only in the candidate set ``C``:

- ``slackfit``: every sub-net;
- ``max-accuracy``: the most accurate sub-net only;
- ``fixed:<name>``: that sub-net only.

Accuracy is what the supernet file records per sub-net (validation accuracy, else test accuracy;
without either, more BOPs counts as more accurate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["POLICIES", "Decision", "Policy", "make_policy"]

POLICIES = ("slackfit", "max-accuracy", "fixed:<name>")


@dataclass(frozen=True)
class Decision:
    """Serve the ``batch`` oldest requests with ``subnet``; or, when ``subnet`` is None, shed the oldest."""

    subnet: str | None
    batch: int


class Policy:
    """``choose(queued, slack_ms, latency)``: the decision for the next batch.

    ``candidates`` are sub-net names from the most to the least accurate.
    """

    def __init__(self, name: str, candidates: Sequence[str], max_batch: int) -> None:
        if not candidates:
            raise ValueError(f"policy {name!r}: no candidate sub-nets")
        self.name, self.candidates, self.max_batch = name, list(candidates), int(max_batch)

    def choose(self, queued: int, slack_ms: float, latency: Callable[[str, int], float]) -> Decision:
        for b in range(min(queued, self.max_batch), 0, -1):
            for s in self.candidates:
                if latency(s, b) <= slack_ms:
                    return Decision(s, b)
        return Decision(None, 0)


def make_policy(spec: str, accuracy: Mapping[str, float], max_batch: int) -> Policy:
    """``slackfit``, ``max-accuracy`` or ``fixed:<name>`` over the sub-nets of ``accuracy``
    (name -> accuracy, any order)."""
    ranked = sorted(accuracy, key=lambda n: -accuracy[n])
    if spec == "slackfit":
        return Policy(spec, ranked, max_batch)
    if spec == "max-accuracy":
        return Policy(spec, ranked[:1], max_batch)
    if isinstance(spec, str) and spec.startswith("fixed:"):
        name = spec.split(":", 1)[1]
        if name not in accuracy:
            raise ValueError(f"policy {spec!r}: no sub-net {name!r}; sub-nets: {', '.join(accuracy)}")
        return Policy(spec, [name], max_batch)
    raise ValueError(f"unknown policy {spec!r}; allowed: slackfit, max-accuracy, fixed:<name> "
                     f"with a name among {', '.join(accuracy)}")
