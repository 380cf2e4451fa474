"""Meta Pseudo Labels (Pham et al., CVPR 2021): losses, state, the pure step, the wrapper."""

from metapl.mpl.config import MPL_METHODS, MPLConfig
from metapl.mpl.losses import UDA, sample_categorical
from metapl.mpl.module import MPL
from metapl.mpl.state import MPLState, Net, ema_update
from metapl.mpl.step import Batch, mpl_step

__all__ = [
    "MPL",
    "MPL_METHODS",
    "UDA",
    "Batch",
    "MPLConfig",
    "MPLState",
    "Net",
    "ema_update",
    "mpl_step",
    "sample_categorical",
]
