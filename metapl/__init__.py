"""metapl: meta-gradients in PyTorch, and Meta Pseudo Labels built on them."""

from metapl import optim
from metapl.finetune import finetune
from metapl.metagrad import CG, METHODS, MetaGradResult, Neumann, implicit_grad, meta_grad
from metapl.mpl import MPL, UDA, MPLState, mpl_step
from metapl.vat import VAT

__all__ = [
    "CG",
    "METHODS",
    "MPL",
    "MPLState",
    "UDA",
    "VAT",
    "MetaGradResult",
    "Neumann",
    "finetune",
    "implicit_grad",
    "meta_grad",
    "mpl_step",
    "optim",
]
__version__ = "0.1.0"
