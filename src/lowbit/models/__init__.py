"""lowbit.models: the model zoo (imports nothing of lowbit).

from lowbit.models import build_model, layer_table, list_models

model = build_model("resnet20", width_mult=2.0)
model.lowbit_spec  # {"name": "resnet20", "kwargs": {"num_classes": 10, ..., "width_mult": 2.0}}
same = build_model(**model.lowbit_spec)  # what load_packed does for zoo models
table = layer_table(model, (3, 32, 32))  # per conv/linear: shapes, params, MACs
"""

from .hsi import HSICNN3d
from .lenet import LeNet5, LeNet5Avg, ReLeQLeNet, ReLeQSimpleNet
from .mlp import MLP
from .mobilenet import DepthwiseSeparable, MobileNetTiny
from .registry import MODELS, ModelEntry, build_from_spec, build_model, list_models, register_model
from .resnet import (
    BasicBlock,
    PadShortcut,
    ResNet,
    ResNetCifar,
    resnet18,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)
from .summary import LayerInfo, count_params, layer_table
from .svhn import SVHNCNN, DoReFaSVHN
from .vgg import VGG11, VGGSmall

__all__ = [
    "MLP",
    "MODELS",
    "SVHNCNN",
    "VGG11",
    "BasicBlock",
    "DepthwiseSeparable",
    "DoReFaSVHN",
    "HSICNN3d",
    "LayerInfo",
    "LeNet5",
    "LeNet5Avg",
    "MobileNetTiny",
    "ModelEntry",
    "PadShortcut",
    "ReLeQLeNet",
    "ReLeQSimpleNet",
    "ResNet",
    "ResNetCifar",
    "VGGSmall",
    "build_from_spec",
    "build_model",
    "count_params",
    "layer_table",
    "list_models",
    "register_model",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]
