"""Serving a weight-shared supernet under a latency target: the supernet file, the engine of each
sub-net (packed runtime or PyTorch), per-sub-net latency profiles, batch policies (SlackFit, fixed,
max-accuracy), the batching queue, the ASGI server
(``lowbit serve``) and a loopback load generator (``lowbit bench serve``).

The HTTP parts (starlette, uvicorn, httpx: ``pip install lowbit[serve]``) are imported only by
:mod:`lowbit.serve.app` and :mod:`lowbit.serve.loadgen`.
"""

from .engines import RUNTIMES, SubnetEngines
from .file import load_supernet, save_supernet
from .policy import POLICIES, Decision, Policy, make_policy
from .profile import LatencyProfile, profile_supernet, time_batch

__all__ = [
    "POLICIES",
    "RUNTIMES",
    "Decision",
    "LatencyProfile",
    "Policy",
    "SubnetEngines",
    "load_supernet",
    "make_policy",
    "profile_supernet",
    "save_supernet",
    "time_batch",
]
