"""eplb_triton: move MoE expert weights between ranks when an EP runtime rebalances.

Data flow: maps -> plan -> layout -> kernels -> comm -> transfer -> worker.
"""

from .layout import ExpertLayout
from .maps import ExpertMaps, normalize_maps
from .plan import LayerPlan, RankPlan, RearrangementPlan, plan_layer, plan_rearrangement
from .transfer import TransferStats, rearrange_expert_weights_inplace
from .worker import TransferWorker
from .align import align_placement, linear_assignment  # planner (issue 5)
from .plan import SENDER_POLICIES, normalize_elastic_maps  # planner (issue 5)

__version__ = "0.1.0"

__all__ = [
    "ExpertLayout",
    "ExpertMaps",
    "LayerPlan",
    "RankPlan",
    "RearrangementPlan",
    "TransferStats",
    "TransferWorker",
    "normalize_maps",
    "plan_layer",
    "plan_rearrangement",
    "rearrange_expert_weights_inplace",
    # planner (issue 5)
    "SENDER_POLICIES",
    "align_placement",
    "linear_assignment",
    "normalize_elastic_maps",
]
