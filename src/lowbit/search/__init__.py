"""Mixed-precision search: which bit-width for which layer."""

from .qdarts import QDARTSConfig, QDARTSResult, SearchSpace, SuperNet, build_derived, derive, qdarts_search
from .releq import FineTuneEvaluator, PPOAgent, ReLeQ, ReLeQResult, exhaustive, releq_reward
from .width import model_weight_bits, width_for_budget

__all__ = ["FineTuneEvaluator", "PPOAgent", "QDARTSConfig", "QDARTSResult", "ReLeQ", "ReLeQResult",
           "SearchSpace", "SuperNet", "build_derived", "derive", "exhaustive", "model_weight_bits",
           "qdarts_search", "releq_reward", "width_for_budget"]
