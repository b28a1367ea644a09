"""Mixed-precision search: which bit-width for which layer."""

from .releq import FineTuneEvaluator, PPOAgent, ReLeQ, ReLeQResult, exhaustive, releq_reward

__all__ = ["FineTuneEvaluator", "PPOAgent", "ReLeQ", "ReLeQResult", "exhaustive", "releq_reward"]
