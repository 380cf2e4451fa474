"""metapl: meta-gradients in PyTorch, and Meta Pseudo Labels built on them."""

from metapl import optim
from metapl.finetune import finetune
from metapl.metagrad import (
    CG,
    METHODS,
    Exact,
    FiniteDifference,
    FirstOrder,
    Implicit,
    MetaGradResult,
    MethodSpec,
    Neumann,
    ScoreFunction,
    implicit_grad,
    meta_grad,
)
from metapl.mpl import MPL, UDA, MPLState, mpl_step
from metapl.vat import VAT

__all__ = [
    "CG",
    "Exact",
    "FiniteDifference",
    "FirstOrder",
    "Implicit",
    "METHODS",
    "MPL",
    "MPLState",
    "UDA",
    "VAT",
    "MetaGradResult",
    "MethodSpec",
    "Neumann",
    "ScoreFunction",
    "finetune",
    "implicit_grad",
    "meta_grad",
    "mpl_step",
    "optim",
]
__version__ = "0.1.0"
