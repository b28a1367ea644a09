"""Mixed-precision search: which bit-width for which layer."""

from .releq import FineTuneEvaluator, PPOAgent, ReLeQ, ReLeQResult, exhaustive, releq_reward
from .width import model_weight_bits, width_for_budget

__all__ = ["FineTuneEvaluator", "PPOAgent", "ReLeQ", "ReLeQResult", "exhaustive", "model_weight_bits",
           "releq_reward", "width_for_budget"]
