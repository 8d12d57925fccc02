"""eplb_triton: move MoE expert weights between ranks when an EP runtime rebalances.

Data flow: maps -> plan -> (schedule) -> layout -> kernels -> comm -> transfer -> worker.
"""

from .align import align_placement, linear_assignment
from .comm import ChecksumMismatchError, PeerError, PeerFailedError, PeerTimeoutError, TransferError
from .layout import ExpertLayout
from .maps import ExpertMaps, normalize_maps
from .pacing import TransferProgress
from .plan import (
    SENDER_POLICIES,
    LayerPlan,
    RankPlan,
    RearrangementPlan,
    normalize_elastic_maps,
    plan_layer,
    plan_rearrangement,
)
from .transfer import TransferStats, rearrange_expert_weights_inplace, reserve
from .worker import TransferWorker

__version__ = "0.1.0"

__all__ = [
    "SENDER_POLICIES",
    "ChecksumMismatchError",
    "ExpertLayout",
    "ExpertMaps",
    "LayerPlan",
    "PeerError",
    "PeerFailedError",
    "PeerTimeoutError",
    "RankPlan",
    "RearrangementPlan",
    "TransferError",
    "TransferProgress",
    "TransferStats",
    "TransferWorker",
    "align_placement",
    "linear_assignment",
    "normalize_elastic_maps",
    "normalize_maps",
    "plan_layer",
    "plan_rearrangement",
    "rearrange_expert_weights_inplace",
    "reserve",
]
