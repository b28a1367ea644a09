"""The CNNs built to convert cleanly into spiking twins live in the model zoo (``lowbit_spec``,
``build_model``, ``lowbit train --model``): ``lenet5_avg`` (:class:`~lowbit.models.LeNet5Avg`) and
``hsi_cnn3d`` (:class:`~lowbit.models.HSICNN3d`, with its reshapes ``AddChannel`` and
``FoldDepth``). Re-exported here for ``from lowbit.snn import LeNet5Avg, HSICNN3d``."""

from ..models.hsi import AddChannel, FoldDepth, HSICNN3d
from ..models.lenet import LeNet5Avg

__all__ = ["AddChannel", "FoldDepth", "HSICNN3d", "LeNet5Avg"]
