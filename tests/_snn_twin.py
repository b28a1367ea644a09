"""The spiking twin that ``lowbit snn convert`` saved, rebuilt (imported by the SNN test files)."""

from __future__ import annotations

from pathlib import Path

import torch

import lowbit
from lowbit.experiment import load_run
from lowbit.snn import convert
from lowbit.train.checkpoint import load_checkpoint


def saved_twin_accuracy(run: Path, ckpt: Path, timesteps: int) -> float:
    """Top-1 on the float run's test split of the 6-bit spiking twin saved in ``ckpt``: the twin is
    rebuilt from the run and the file, and its hits are counted here."""
    cnn, data, _ = load_run(run)
    snn = lowbit.quantize(convert(cnn.eval(), timesteps), lowbit.load_recipe("snn-w6"))
    load_checkpoint(ckpt, snn)
    snn.eval()
    with torch.no_grad():
        hits = sum(int((snn(x).argmax(1) == y).sum()) for x, y in data.test)
    return hits / data.test.num_samples
