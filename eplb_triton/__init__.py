"""eplb_triton: move MoE expert weights between ranks when an EP runtime rebalances.

Data flow: maps -> plan -> layout -> kernels -> comm -> transfer -> worker.
"""

from .layout import ExpertLayout
from .maps import ExpertMaps, normalize_maps
from .plan import LayerPlan, RankPlan, RearrangementPlan, plan_layer, plan_rearrangement
from .transfer import TransferStats, rearrange_expert_weights_inplace
from .worker import TransferWorker

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
]
