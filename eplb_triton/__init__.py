"""eplb_triton: move MoE expert weights between ranks when an EP runtime rebalances.

What a runtime calls is exported here: the blocking API (``rearrange_expert_weights_inplace``,
``reserve`` for its staging, ``TransferStats``), the background ``TransferWorker`` (and the
``TransferProgress`` its ``progress`` returns), the planning
entry points (``plan_rearrangement``, ``align_placement``) and the errors. Internals (plan
types, the packed layout, the communicator...) stay importable from their modules.

Data flow: inputs/maps -> plan -> schedule -> layout -> kernels -> comm -> transfer -> worker.
"""

from .align import align_placement
from .errors import ChecksumMismatchError, PeerError, PeerFailedError, PeerTimeoutError, TransferError
from .pacing import TransferProgress
from .plan import RearrangementPlan, plan_rearrangement
from .transfer import TransferStats, rearrange_expert_weights_inplace, reserve
from .worker import TransferWorker

__version__ = "0.1.0"

__all__ = [
    "ChecksumMismatchError",
    "PeerError",
    "PeerFailedError",
    "PeerTimeoutError",
    "RearrangementPlan",
    "TransferError",
    "TransferProgress",
    "TransferStats",
    "TransferWorker",
    "align_placement",
    "plan_rearrangement",
    "rearrange_expert_weights_inplace",
    "reserve",
]
