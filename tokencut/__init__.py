"""TokenCut unsupervised object discovery (Wang et al., TPAMI 2023) and CorLoc evaluation.

``python -m tokencut.run --help`` for the command line; the algorithm is in ``tokencut.ncut``
(batched torch), the official scipy path in ``tokencut.scipy_ref``.
"""

from .corloc import best_iou, box_iou, corloc
from .ncut import (
    NCutResult,
    TokenCutConfig,
    affinity,
    component_box,
    second_eigvec_lobpcg,
    second_eigvec_torch,
    seed_and_bipartition,
    seed_component,
    tokencut_batch,
)

__all__ = [
    "NCutResult",
    "TokenCutConfig",
    "affinity",
    "best_iou",
    "box_iou",
    "component_box",
    "corloc",
    "seed_and_bipartition",
    "seed_component",
    "second_eigvec_lobpcg",
    "second_eigvec_torch",
    "tokencut_batch",
]
