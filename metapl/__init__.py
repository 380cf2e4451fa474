"""metapl: meta-gradients in PyTorch, and Meta Pseudo Labels built on them."""

from metapl import optim
from metapl.finetune import finetune
from metapl.metagrad import METHODS, MetaGradResult, meta_grad
from metapl.mpl import MPL, UDA

__all__ = ["METHODS", "MPL", "UDA", "MetaGradResult", "finetune", "meta_grad", "optim"]
__version__ = "0.1.0"
