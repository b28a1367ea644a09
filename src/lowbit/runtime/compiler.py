"""``compile(model, example_input) -> PackedModel``: a quantized model as packed inference.

1. The model is copied and put in eval mode; the inputs of its quantized layers on
   ``example_input`` are recorded, with the fake-quantized reference output.
2. ``torch.fx`` traces the copy with every quantizable layer (and every quantizer) as a leaf.
   Models that ``symbolic_trace`` cannot follow (data-dependent control flow) are handled by
   swapping modules in place instead, without fusion.
3. Each quantized Linear / Conv2d whose weight codebook and input quantizer fit the kernels
   becomes a :class:`~lowbit.runtime.layers.PackedLinear` / ``PackedConv2d``; others stay in
   PyTorch (reasons in ``PackedModel.layers``).
4. A BatchNorm that reads only a packed layer's output is folded into its per-channel epilogue,
   then a ReLU that follows is fused too.
5. The fused activation quantization (PACT / DoReFa formula inside the kernel) is checked code
   for code against the quantizer's ``encode`` on the recorded inputs; a mismatch switches the
   layer to calling ``encode``. The packed output is compared with the reference output
   (``PackedModel.max_abs_diff``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.quantize import quantizable_layers
from ..quant.base import Quantizer
from . import kernels as K
from .layers import NotPackableError, PackedConv2d, PackedLinear, _PackedBase, build_packed

log = logging.getLogger(__name__)

_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)


@dataclass
class LayerReport:
    name: str
    kind: str  # 'packed' | 'torch'
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "detail": self.detail}


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._leaves or isinstance(m, Quantizer):
            return True
        return super().is_leaf_module(m, qualname)


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCS and len(node.args) == 1
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and len(node.args) == 1
    return False


class PackedModel(nn.Module):
    """Callable packed inference of a quantized model (CPU, no autograd)."""

    def __init__(self, graph_module: nn.Module, layers: list[LayerReport], traced: bool) -> None:
        super().__init__()
        self.module = graph_module
        self.layers = layers
        self.traced = traced
        self.max_abs_diff: float = float("nan")
        self.max_rel_diff: float = float("nan")
        self.eval()

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        with torch.inference_mode():
            return self.module(x, *args, **kwargs)

    def packed_layers(self) -> dict[str, _PackedBase]:
        return {n: m for n, m in self.module.named_modules() if isinstance(m, _PackedBase)}

    def weight_bytes(self) -> int:
        """Bytes of everything that holds weights: packed planes + per-channel float32 scale and
        bias for packed layers, float32 for all parameters and buffers left in PyTorch."""
        total = sum(m.weight_bytes for m in self.packed_layers().values())
        for p in list(self.module.parameters()) + list(self.module.buffers()):
            if p.is_floating_point():
                total += 4 * p.numel()
        return total

    def summary(self) -> str:
        rows = [f"{r.name:<28} {r.kind:<7} {r.detail}" for r in self.layers]
        return "\n".join(rows)

    def extra_repr(self) -> str:
        n = sum(r.kind == "packed" for r in self.layers)
        return f"packed_layers={n}/{len(self.layers)}, traced={self.traced}"


def _record_inputs(model: nn.Module, layers: dict[str, nn.Module], example: Any) -> tuple[dict, Any]:
    seen: dict[str, Tensor] = {}
    hooks = []
    for name, layer in layers.items():

        def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
            if args and isinstance(args[0], Tensor) and name not in seen:
                seen[name] = args[0].detach()

        # prepend: record the float input before the layer's input-quantizer pre-hook runs
        hooks.append(layer.register_forward_pre_hook(pre, prepend=True))
    try:
        with torch.no_grad():
            ref = model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen, ref


def _check_fused_codes(pm: _PackedBase, x: Tensor) -> bool:
    """True when the kernel's fused quantization gives the quantizer's encode codes."""
    q = input_quantizer_of(pm)
    if pm.act.mode != 0 or q is None:
        return True
    with torch.no_grad():
        ref = q.encode(x).codes.to(torch.int64).numpy()
    got = K.quantize_codes(x.contiguous().float().numpy(), pm.act.hi, pm.act.mult)
    return bool(np.array_equal(ref, got.astype(np.int64)))


def input_quantizer_of(pm: _PackedBase):
    return pm.__dict__.get("act_quantizer")


def compile(
    model: nn.Module,
    example_input: Any,
    *,
    fuse: bool = True,
    check: bool = True,
) -> PackedModel:
    """Compile a quantized model (output of :func:`lowbit.quantize`) into packed inference.

    ``example_input`` is one batch of inputs (any batch size); it traces shapes, checks the
    fused activation quantizers and measures ``max_abs_diff`` against the fake-quantized model.
    The model itself is not modified (a copy is compiled).
    """
    src = copy.deepcopy(model).eval()
    if isinstance(example_input, np.ndarray):
        example_input = torch.from_numpy(example_input)
    qlayers = quantizable_layers(src)
    inputs, ref = _record_inputs(src, qlayers, example_input) if check else ({}, None)
    reports: list[LayerReport] = []
    packed: dict[str, _PackedBase] = {}
    for name, layer in qlayers.items():
        try:
            pm = build_packed(name, layer)
        except NotPackableError as e:
            reports.append(LayerReport(name, "torch", str(e)))
            log.info("runtime: %s stays in PyTorch: %s", name, e)
            continue
        if name in inputs:
            pm.input_ndim = inputs[name].dim()
        if name in inputs and not _check_fused_codes(pm, inputs[name]):
            log.warning("runtime: fused quantizer of %s differs from encode(); using encode()", name)
            pm.act.mode = 1
        packed[name] = pm
    traced = True
    try:
        gm = fx.GraphModule(src, _LeafTracer({id(m) for m in qlayers.values()}).trace(src))
    except Exception as e:
        log.warning("runtime: torch.fx could not trace the model (%s); packing without fusion", e)
        traced = False
        gm = src
    if traced:
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in packed:
                _set_submodule(gm, node.target, packed[node.target])
        if fuse:
            _fuse(gm, packed)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    else:
        for name, pm in packed.items():
            _set_submodule(gm, name, pm)
    for name, pm in packed.items():
        reports.append(LayerReport(name, "packed", pm.describe()))
    order = {n: i for i, n in enumerate(qlayers)}
    reports.sort(key=lambda r: order.get(r.name, 0))
    out = PackedModel(gm, reports, traced)
    if check and ref is not None:
        got = out(example_input)
        if isinstance(ref, Tensor) and isinstance(got, Tensor):
            diff = (got.float() - ref.float()).abs()
            out.max_abs_diff = float(diff.max()) if diff.numel() else 0.0
            out.max_rel_diff = out.max_abs_diff / max(float(ref.abs().max()), 1e-12)
            if out.max_rel_diff > 1e-3:
                log.warning(
                    "runtime: packed model differs from the fake-quantized model by %.3g (relative %.3g)",
                    out.max_abs_diff, out.max_rel_diff,
                )
    return out


def _fuse(gm: fx.GraphModule, packed: dict[str, _PackedBase]) -> None:
    """Fold BatchNorm (then ReLU) into the packed layer whose only user they are."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in packed:
            continue
        pm = packed[node.target]
        cur = node
        users = list(cur.users)
        if len(users) == 1 and users[0].op == "call_module" and users[0].args[:1] == (cur,):
            bn = gm.get_submodule(str(users[0].target))
            ok = (isinstance(pm, PackedConv2d) and type(bn) is nn.BatchNorm2d) or (
                isinstance(pm, PackedLinear) and type(bn) is nn.BatchNorm1d and pm.input_ndim == 2
            )
            if ok and not bn.training and bn.num_features == pm.out_features:
                try:
                    pm.fold_bn(bn)
                except NotPackableError:
                    pass
                else:
                    users[0].replace_all_uses_with(cur)
                    gm.graph.erase_node(users[0])
        users = list(cur.users)
        if len(users) == 1 and _is_relu(gm, users[0]) and users[0].args[0] is cur:
            pm.fuse_relu()
            users[0].replace_all_uses_with(cur)
            gm.graph.erase_node(users[0])

