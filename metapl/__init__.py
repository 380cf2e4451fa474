"""metapl: meta-gradients in PyTorch, and Meta Pseudo Labels built on them."""

from metapl import optim
from metapl.finetune import finetune
from metapl.metagrad import CG, METHODS, MetaGradResult, Neumann, meta_grad
from metapl.mpl import MPL, UDA

__all__ = [
    "CG", "METHODS", "MPL", "UDA", "MetaGradResult", "Neumann", "finetune", "meta_grad", "optim",
]
__version__ = "0.1.0"
