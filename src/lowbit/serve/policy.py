"""Which sub-net serves the next batch, how large the batch is, and which requests are shed.

SuperServe's SlackFit (Khare et al. 2023, "SuperServe: fine-grained inference serving for
unpredictable workloads", seed 002; a scheduler that picks, per batch, among the operating points
of a weight-shared supernet under unpredictable load). With ``n`` samples queued, the oldest
request having ``slack`` milliseconds left before its deadline, and ``lat(s, b)`` the profiled
latency of sub-net ``s`` at batch ``b``::

    for b = min(n, max_batch) down to 1:
        s* = the most accurate sub-net s in C with lat(s, b) <= slack
        if s* exists: serve the b oldest samples (whole requests) with s*
    otherwise the oldest request cannot meet its deadline: shed it (503) and decide again

Taking the largest batch first keeps throughput up when the queue grows; the accuracy then falls
only as far as the slack forces it. The policies differ only in the candidate set ``C``:

- ``slackfit``: every sub-net;
- ``max-accuracy``: the most accurate sub-net only;
- ``fixed:<name>``: that sub-net only.

``slackfit-queue`` looks at the whole queue, not only its oldest request. SlackFit's rule suits
an SLO of a few batch latencies (the oldest request's slack shrinks as soon as a backlog forms);
with an SLO of many batch latencies the oldest request keeps a large slack while the queue behind
it grows, so SlackFit serves the slowest, most accurate sub-net until the backlog holds more work
than the deadlines allow. Simulated on the CIFAR-10 ResNet-20 supernet (500 ms SLO, 20-70 ms
batches; ``benchmarks/results/serve_policy_sim.md``), 38-41% of SlackFit's 8-bit batches on the
constant and bursty traces were chosen when that sub-net could no longer meet every queued
deadline.
With the queue ``r_1 .. r_n`` in serving order (arrival order; with the server's one SLO that is
deadline order), request ``i`` holding ``k_i`` samples and ``sigma_i`` ms of slack, cut it into
consecutive batches ``B_1, B_2, ...`` of whole requests of at most ``max_batch`` samples
(``b_j`` samples each). Served by sub-net ``s``, batch ``j`` ends at
``F_j(s) = sum_{l <= j} lat(s, b_l)``, and request ``i`` in ``B_j`` meets its deadline iff
``F_j(s) <= sigma_i``; ``met(s)`` counts those. Then:

1. shed at once every request that no sub-net's plan meets (``sigma_i < min_s F_j(s)``): it would
   only be served late and delay the others;
2. on the rest (batches cut again), ``fit`` = the sub-nets with ``met(s) = n``. A queue that fits
   now can still be lost to the requests arriving while it is served, so with ``lambda`` the
   recent arrival rate (requests per ms, measured by the caller; 0 turns this off) and
   ``cap(s) = floor(max_batch / mean k) / lat(s, max_batch)`` the rate ``s`` serves at full
   batches: ``s*`` = the most accurate sub-net in ``fit`` with ``cap(s) >= lambda``; if every
   sub-net in ``fit`` falls behind the arrivals, the one in ``fit`` with the largest
   ``acc(s) cap(s)``; if ``fit`` is empty, the sub-net with the largest ``acc(s) met(s)`` (ties:
   the more accurate);
3. serve ``B_1`` with ``s*``.

``acc(s) cap(s)`` and ``acc(s) met(s)`` count correct answers (per ms; in time) rather than
answers: with sub-nets of nearly equal speed (this repository's 2- and 4-bit ResNet-20 run equally
fast in the packed runtime) the plain counts flip between them on profiling noise and serve the far
less accurate one for a 1% gain. Without accuracies in (0, 1] (e.g. a ranking only) ``acc`` is 1.

The batching is the same for every sub-net, so one decision costs
``O(n log max_batch + (n / max_batch) x |C|)``. It departs from SuperServe in that (a) the fit is
checked for every queued request against its own deadline, not for the earliest deadline only,
(b) requests that cannot be met are shed before choosing, where SuperServe drops only requests
already past their deadline, (c) it looks at the arrival rate, which SlackFit leaves to the slack,
and (d) it has no latency buckets (SuperServe groups (sub-net, batch) pairs into buckets of
latency): it compares accuracies directly. Latencies are what the server plans with (profile x
the online scale, see :mod:`lowbit.serve.batching`).

Accuracy is what the supernet file records per sub-net (validation accuracy, else test accuracy;
without either, more BOPs counts as more accurate).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["POLICIES", "Decision", "Policy", "QueuePolicy", "cut_batches", "make_policy", "plan_met"]

POLICIES = ("slackfit", "slackfit-queue", "max-accuracy", "fixed:<name>")

Latency = Callable[[str, int], float]


@dataclass(frozen=True)
class Decision:
    """Shed the queued requests at the indices ``shed`` (0 = the oldest); then serve the first
    ``batch`` samples (whole requests) of what remains with ``subnet``. ``subnet`` None and no
    ``shed``: shed the oldest request and decide again."""

    subnet: str | None
    batch: int
    shed: tuple[int, ...] = ()


class Policy:
    """SlackFit over ``candidates`` (sub-net names from the most to the least accurate).

    ``choose(queued, slack_ms, latency)``: the decision from the number of queued samples and the
    oldest request's slack; ``decide(sizes, slack_ms, latency, rate)``: the decision from the whole
    queue (samples and slack of every request, in serving order) and the recent arrival rate
    (requests per ms), which SlackFit reduces to ``choose``.
    """

    def __init__(self, name: str, candidates: Sequence[str], max_batch: int) -> None:
        if not candidates:
            raise ValueError(f"policy {name!r}: no candidate sub-nets")
        self.name, self.candidates, self.max_batch = name, list(candidates), int(max_batch)

    def choose(self, queued: int, slack_ms: float, latency: Latency) -> Decision:
        for b in range(min(queued, self.max_batch), 0, -1):
            for s in self.candidates:
                if latency(s, b) <= slack_ms:
                    return Decision(s, b)
        return Decision(None, 0)

    def decide(
        self, sizes: Sequence[int], slack_ms: Sequence[float], latency: Latency, rate: float = 0.0
    ) -> Decision:
        return self.choose(sum(sizes), slack_ms[0], latency)


def cut_batches(sizes: Sequence[int], max_batch: int) -> list[int]:
    """Where each batch ends: consecutive whole requests of at most ``max_batch`` samples (a
    request larger than that is a batch of its own)."""
    ends, n = [], 0
    for i, k in enumerate(sizes):
        if n and n + k > max_batch:
            ends.append(i)
            n = 0
        n += k
    if sizes:
        ends.append(len(sizes))
    return ends


def plan_met(
    sizes: Sequence[int], slack_ms: Sequence[float], ends: Sequence[int], costs: Sequence[float]
) -> list[bool]:
    """Which requests meet their deadline when the batches ending at ``ends`` run one after another,
    batch ``j`` taking ``costs[j]`` ms (the plain form of the rule, for checks and traces)."""
    met, t, start = [], 0.0, 0
    for end, c in zip(ends, costs, strict=True):
        t += c
        met += [slack_ms[i] >= t for i in range(start, end)]
        start = end
    return met


class QueuePolicy(Policy):
    """``slackfit-queue``: the most accurate sub-net that meets every queued deadline (see the
    module docstring), shedding the requests that no sub-net can meet. ``accuracy`` (name ->
    accuracy in (0, 1]) weighs the deadlines met when none fits; without it each counts 1."""

    def __init__(self, name: str, candidates: Sequence[str], max_batch: int,
                 accuracy: Mapping[str, float] | None = None) -> None:
        super().__init__(name, candidates, max_batch)
        ok = accuracy is not None and all(0 < accuracy.get(c, 0) <= 1 for c in self.candidates)
        self.weight = {c: float(accuracy[c]) for c in self.candidates} if ok and accuracy else {}

    def _batches(
        self, sizes: Sequence[int], slack_ms: Sequence[float]
    ) -> tuple[list[int], list[int], list[list[float]]]:
        ends = cut_batches(sizes, self.max_batch)
        samples, slacks, start = [], [], 0
        for end in ends:
            samples.append(sum(sizes[start:end]))
            slacks.append(sorted(slack_ms[start:end]))
            start = end
        return ends, samples, slacks

    def _finish(self, s: str, samples: Sequence[int], latency: Latency) -> list[float]:
        cost: dict[int, float] = {}
        out, t = [], 0.0
        for b in samples:
            if b not in cost:
                cost[b] = latency(s, b)
            t += cost[b]
            out.append(t)
        return out

    def decide(
        self, sizes: Sequence[int], slack_ms: Sequence[float], latency: Latency, rate: float = 0.0
    ) -> Decision:
        ends, samples, slacks = self._batches(sizes, slack_ms)
        finish = [self._finish(s, samples, latency) for s in self.candidates]
        first = list(map(min, *finish)) if len(finish) > 1 else finish[0]  # the earliest end of each batch
        shed, start = [], 0
        for j, end in enumerate(ends):
            if slacks[j][0] < first[j]:  # someone in batch j is hopeless
                shed += [i for i in range(start, end) if slack_ms[i] < first[j]]
            start = end
        if shed:
            gone = set(shed)
            keep = [i for i in range(len(sizes)) if i not in gone]
            if not keep:
                return Decision(None, 0, tuple(shed))
            sizes = [sizes[i] for i in keep]
            slack_ms = [slack_ms[i] for i in keep]
            ends, samples, slacks = self._batches(sizes, slack_ms)
        per_batch = max(1, self.max_batch // max(1, round(sum(sizes) / len(sizes))))  # whole requests
        fit, best, best_score = [], self.candidates[0], -1.0
        for s in self.candidates:  # most accurate first: a tie keeps the earlier one
            met = sum(len(sl) - bisect_left(sl, t) for sl, t in zip(slacks, self._finish(s, samples, latency),
                                                                     strict=True))
            if met == len(sizes):
                cap = per_batch / latency(s, self.max_batch)  # requests per ms at full batches
                if cap >= rate:
                    return Decision(s, samples[0], tuple(shed))
                fit.append((cap * self.weight.get(s, 1.0), s))
            elif met * self.weight.get(s, 1.0) > best_score and not fit:
                best, best_score = s, met * self.weight.get(s, 1.0)
        if fit:  # every sub-net that meets the queue falls behind the arrivals: the most correct answers/ms
            best = max(fit, key=lambda cs: cs[0])[1]
        return Decision(best, samples[0], tuple(shed))


def make_policy(spec: str, accuracy: Mapping[str, float], max_batch: int) -> Policy:
    """``slackfit``, ``slackfit-queue``, ``max-accuracy`` or ``fixed:<name>`` over the sub-nets of
    ``accuracy`` (name -> accuracy, any order)."""
    ranked = sorted(accuracy, key=lambda n: -accuracy[n])
    if spec == "slackfit":
        return Policy(spec, ranked, max_batch)
    if spec == "slackfit-queue":
        return QueuePolicy(spec, ranked, max_batch, accuracy)
    if spec == "max-accuracy":
        return Policy(spec, ranked[:1], max_batch)
    if isinstance(spec, str) and spec.startswith("fixed:"):
        name = spec.split(":", 1)[1]
        if name not in accuracy:
            raise ValueError(f"policy {spec!r}: no sub-net {name!r}; sub-nets: {', '.join(accuracy)}")
        return Policy(spec, [name], max_batch)
    raise ValueError(f"unknown policy {spec!r}; allowed: slackfit, slackfit-queue, max-accuracy, "
                     f"fixed:<name> with a name among {', '.join(accuracy)}")
