"""metapl: meta-gradients in PyTorch, and Meta Pseudo Labels built on them."""

from metapl import optim
from metapl.metagrad import METHODS, MetaGradResult, meta_grad

__all__ = ["METHODS", "MetaGradResult", "meta_grad", "optim"]
__version__ = "0.1.0"
