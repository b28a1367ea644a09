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
4b. int8 convolutions (``PackedConv2d`` with the VNNI kernel) are linked in NHWC: a residual
   addition of the output (then a ReLU) moves into the epilogue; a producer whose output feeds
   an int8 convolution (directly or through a ``MaxPool2d``) or, through a ``MaxPool2d`` and a
   flatten, a Linear layer, writes that layer's input codes itself (``Codes``), so the float
   tensor is written only for the other users, if any; a global average pool of the output
   reads the NHWC floats directly (``GlobalAvgPool2d``).
4c. A Linear layer on AMX whose only user is another Linear layer on AMX writes that layer's
   input codes in the AMX tile layout from its epilogue (``CodeTiles``, :func:`_link_tiles`), for
   the row counts the consumer runs on AMX.
5. The fused activation quantization (the formula of the quantizer's ``runtime_codes_spec()``,
   inside the kernel; for a signed grid one ``kernels_codes`` pass before it) is checked code for
   code against its ``encode`` on the recorded inputs; a
   mismatch switches the layer to calling ``encode`` (and unlinks it from step 4b). The packed
   output is compared with the reference output (``PackedModel.max_abs_diff``).
6. The graph calls the runtime's modules through their bound ``forward`` (no ``nn.Module``
   call overhead), and, for conv nets with int8 layers whose samples are independent, large
   batches run in cache-sized chunks spread over threads (``PackedModel.batch_chunk``). Other
   models whose samples are independent (a transformer encoder) run a batch of enough rows in one
   part per thread, each part through the whole model on its thread (``PackedModel.split_work``).
7. A graph made only of what the flat executor runs (int8 convolutions and Linear layers with
   fused input quantizers, code pools, global average pooling, option-A shortcuts, flatten) runs
   as one numba call per batch (``executor.py``, ``PackedModel.executor``; convolutions on AMX
   tiles where the CPU has them): no Python between layers. Other graphs, and inputs it cannot
   take, run module by module as above.
8. A call on one sample of at most ``SERIAL_MAX_NUMEL`` input values runs on the calling thread
   (PyTorch's intra-op threads and the kernels' both 1 for the call); where the graph is one
   straight chain of the runtime's modules (``PackedModel.chain``, an MLP), straight from
   ``PackedModel.__call__`` through their bound forwards.

What stays in PyTorch, and why (``PackedModel.summary()`` lists every quantized layer as
``packed`` or ``torch`` with its reason, ``PackedModel.layers`` holds the same rows, and each
layer that stays in PyTorch is logged at INFO level):

| layer | why it stays in PyTorch |
|---|---|
| quantized ConvTranspose, Conv3d, LSTM/GRU, Embedding | no packed kernel for them |
| a quantized layer whose forward is not called | its parent reads the weight (``out_proj`` of |
|                                                 | ``MultiheadAttention``) |
| weight levels not binary, ternary (+-2**e units) or uniform | not a signed sum of bit planes |
| (TTQ's asymmetric levels, learned codebooks, multi-branch) | |
| input quantizer: per-channel scale, non-uniform levels, > 8 bits | the codes are not one affine grid |
| conv padding_mode other than zeros, padding off the code grid | the padded codes would differ |
| layers without a quantized weight (LayerNorm, embeddings, softmax, | float layers, run as they are |
| attention's matmuls, activations other than ReLU, other pooling) | between packed ones |
| a BatchNorm that reads more than a packed layer's output | not folded; runs after it |

Models ``torch.fx`` cannot trace (data-dependent control flow) are packed layer by layer: each
packable layer is replaced in place (a warning is logged), without the fusions of steps 4, 4b, 6.
Without ``example_input`` such a model is an error (the layers the model calls are unknown).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _tm

from ..export.packed import encode_weight, refresh_rnn_weights
from ..nn.quantize import input_quantizer, quantizable_layers, quantized_layers, weight_quantizer
from ..quant.base import Encoded, Quantizer
from . import kernels as K
from . import kernels_amx as KA
from . import kernels_gemv as KV
from . import kernels_threads as KT
from .executor import FlatExecutor, check_finite, input_dtype_error
from .layers import (
    CodeMaxPool2d,
    CodeTarget,
    GlobalAvgPool2d,
    NotPackableError,
    PackedConv2d,
    PackedLinear,
    TileTarget,
    _PackedBase,
    build_packed,
    code_poolable,
    decompose_weight,
    is_global_avgpool,
    plane_integers,
    spec_codes,
)

log = logging.getLogger(__name__)

_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)
MIN_THREAD_CHUNK = 8  # split a batch over threads from 2 chunks of this size on
#: a model that ``split_work`` allows runs a batch in one part per thread where each part has at
#: least this many rows (the samples times the rows one sample gives its packed layers, e.g. its
#: tokens) and this many multiply-adds in them. Each part runs the whole model on its own thread,
#: kernels and PyTorch operations on that thread alone. 2 threads against 1, one interleaved run on
#: a quiet 2-core machine: 4-layer BERT encoders of 64 tokens a sample, hidden 256 (201 M
#: multiply-adds a sample in its Linear layers): 0.86-0.88x at 4 samples a part, 1.37x at 8,
#: 1.78-1.92x at 32 (splitting inside each kernel instead, PyTorch's threads and the runtime's
#: taking turns on the cores between operations: 0.80-1.19x); hidden 512 (805 M a sample):
#: 1.28-1.42x at 4 samples a part. A weight-bound model (8 x Linear 4096^2 at 4 rows a part, each
#: part streaming every weight) ran 0.48x.
SPLIT_MIN_ROWS, SPLIT_MIN_MACS = 256, 1_200_000_000


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


# batch chunking: the largest activation of one chunk should stay about this size (L2/L3)
CHUNK_BYTES = 5 << 19
# A call on one sample of at most this many input values runs on the calling thread alone: the
# PyTorch ops between packed layers (LayerNorm, softmax, attention's matmuls, GELU) on one
# intra-op thread and the runtime's kernels unsplit (kernels_threads.set_serial). Each step is then
# microseconds to a few hundred microseconds of work, about what an OpenMP fork/join or a hand-off
# to a second thread costs on a busy machine, and PyTorch's spinning OpenMP pool takes the core the
# runtime's worker needs. Measured on the shared 2-core machine (load 5), BERT-256 batch 1, seq 64
# (16k input values), 2 threads against 1: PyTorch ops on 2 threads 23x slower (median), kernels
# split over 2 threads 1.1-1.4x slower.
SERIAL_MAX_NUMEL = 1 << 16


def _one_small_sample(x: Any, limit: int) -> bool:
    """``x`` is a tensor or array of one sample (leading dimension 1) with at most ``limit`` values."""
    if not isinstance(x, (Tensor, np.ndarray)) or x.ndim == 0:
        return False
    return x.shape[0] == 1 and (x.numel() if isinstance(x, Tensor) else x.size) <= limit


class PackedModel(nn.Module):
    """Callable packed inference of a quantized model (CPU, no autograd).

    Batch chunking (``batch_chunk`` > 0, set by :func:`compile` after checking that samples are
    independent): a large batch runs as chunks of ``batch_chunk`` samples, so that the
    activations of a chunk stay in cache, and with more than one numba thread the chunks are
    spread over worker threads (each running single-threaded kernels; the kernels release the
    GIL). One synchronisation per call instead of one per layer matters on a busy machine."""

    def __init__(self, graph_module: nn.Module, layers: list[LayerReport], traced: bool) -> None:
        super().__init__()
        self.module = graph_module
        self.layers = layers
        self.traced = traced
        self.max_abs_diff: float = float("nan")
        self.max_rel_diff: float = float("nan")
        self.max_rel_diff_fp64: float = float("nan")  # to the float64 model, when it was run
        self.batch_chunk = 0
        # (rows, multiply-adds) one sample gives the packed layers (rows: the fewest of any layer),
        # where samples are independent and a batch may run in one part per thread (SPLIT_MIN_ROWS,
        # SPLIT_MIN_MACS); None: never split
        self.split_work: tuple[int, int] | None = None
        # the whole graph as one numba call (executor.py), set by compile() when it flattens
        self.executor: FlatExecutor | None = None
        # the bound forwards of a graph that is one straight chain of packed layers (_chain_of)
        self.chain: tuple[Callable[[Any], Any], ...] | None = None
        # one sample of at most this many input values: the call runs on one thread (0: never)
        self.serial_numel = SERIAL_MAX_NUMEL
        # the dtype of a one-tensor example_input (None: no example, or not one tensor): a call on
        # one argument must then be a tensor (or array); floats are converted to a floating
        # example's dtype, integers and bools are an error (_entry)
        self.input_dtype: torch.dtype | None = None
        # float16 / bfloat16 models: a tensor output is returned in this dtype, as the fake-quantized
        # model returns it (the packed layers compute in float32); None: as computed
        self.output_dtype: torch.dtype | None = None
        self.eval()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # a tensor the flat executor runs: straight there, unless hooks are set. One image of a shape
        # it has run takes its one-image path; anything else its general path, which is where
        # forward would send it (nn.Module.__call__, forward and its thread guard cost ~4 us, a
        # fifth of a LeNet-5 call at batch 1; ~6 us of ~96 at batch 8)
        ex = self.executor
        chain = self.chain
        if ((ex is not None or chain is not None) and len(args) == 1 and not kwargs
                and self.output_dtype is None
                and type(args[0]) is Tensor
                and not (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                         or self._backward_pre_hooks or _tm._global_forward_hooks
                         or _tm._global_forward_pre_hooks or _tm._global_backward_hooks
                         or _tm._global_backward_pre_hooks)):
            x = args[0]
            if ex is not None:
                y = ex.one(x)
                if y is None:
                    y = ex._call(x)
                if y is not None:
                    return y
            if chain is not None and x.dtype is torch.float32 and not x.requires_grad and x.dim() > 0 \
                    and x.shape[0] == 1 and x.numel() <= self.serial_numel:
                # one small sample through a chain of packed layers: the layers' forwards in a row on
                # this thread, without forward's checks, thread settings and inference mode (nothing
                # here records autograd): the Python around a 2048^2 GEMV was about as long as it
                # (benchmarks/results/ab_chain_call.md)
                check_finite(x)
                prev = KT.set_serial(True)
                try:
                    for f in chain:
                        x = f(x)
                finally:
                    KT.set_serial(prev)
                return x
        return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs:
            x = args[0]
            if self.input_dtype is not None:
                x = self._entry(x)
            elif type(x) is np.ndarray:
                x = torch.from_numpy(x)
            if isinstance(x, Tensor):
                check_finite(x)
            args = (x,)
        first = args[0] if args else next(iter(kwargs.values()), None)
        if _one_small_sample(first, self.serial_numel):
            y = self._forward_serial(args, kwargs)
        else:
            y = self._forward(args, kwargs)
        if self.output_dtype is not None and isinstance(y, Tensor) and y.is_floating_point():
            y = y.to(self.output_dtype)
        return y

    def _entry(self, x: Any) -> Tensor:
        """The one input checked against the example's kind (``input_dtype``): a tensor (an array is
        taken as one), floating point where the example was, in the example's floating dtype."""
        if type(x) is np.ndarray:
            x = torch.from_numpy(x)
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        want = self.input_dtype
        if x.dtype is not want and want is not None and want.is_floating_point:
            if not x.is_floating_point():
                raise input_dtype_error(x.dtype)
            x = x.to(want)
        return x

    def _forward_serial(self, args: tuple, kwargs: dict) -> Any:
        """The call on one thread: PyTorch's intra-op threads and the kernels' (SERIAL_MAX_NUMEL)."""
        nt = torch.get_num_threads()
        prev = KT.set_serial(True)
        if nt > 1:
            torch.set_num_threads(1)
        try:
            return self._forward(args, kwargs)
        finally:
            if nt > 1:
                torch.set_num_threads(nt)
            KT.set_serial(prev)

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        ex = self.executor
        if ex is not None and len(args) == 1 and not kwargs:
            x = torch.from_numpy(args[0]) if type(args[0]) is np.ndarray else args[0]
            y = ex(x) if type(x) is Tensor else None
            if y is not None:
                return y
        args = tuple(torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args)
        with torch.inference_mode():
            x = args[0] if len(args) == 1 else None
            if self.batch_chunk and not kwargs and isinstance(x, Tensor) and x.dim() > 0:
                n = K.num_threads()
                if x.shape[0] > self.batch_chunk or (n > 1 and x.shape[0] >= 2 * MIN_THREAD_CHUNK):
                    return self._forward_chunked(x, n)
            if self.split_work and not kwargs and isinstance(x, Tensor) and x.dim() > 0:
                n = K.num_threads()
                part = x.shape[0] // n
                rows, macs = self.split_work
                if n > 1 and part * rows >= SPLIT_MIN_ROWS and part * macs >= SPLIT_MIN_MACS:
                    return self._forward_split(x, n)
            return self.module(*args, **kwargs)

    def _run(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.module(x)

    def _forward_chunked(self, x: Tensor, nthreads: int, chunk: int | None = None) -> Tensor:
        B = int(x.shape[0])
        chunk = chunk or self.batch_chunk
        if nthreads > 1:  # at least one chunk per thread
            chunk = max(min(chunk, -(-B // nthreads)), 1)
        pieces = [x[i : i + chunk] for i in range(0, B, chunk)]
        if nthreads > 1 and len(pieces) > 1:
            outs = list(K.thread_pool(nthreads).map(self._run, pieces))
        else:
            outs = [self.module(p) for p in pieces]
        return torch.cat(outs)

    def _forward_split(self, x: Tensor, n: int) -> Tensor:
        """``x`` in ``n`` parts, each through the whole model on its own thread (the caller runs the
        first), the kernels and PyTorch's operations of each on that thread alone: no thread waits
        for another between operations, and PyTorch's threads and the runtime's never take turns on
        the cores (``SPLIT_MIN_MACS``)."""
        parts = torch.tensor_split(x, n)
        nt = torch.get_num_threads()
        torch.set_num_threads(1)
        prev = KT.set_serial(True)
        try:
            futs = [K.thread_pool(n).submit(self._run_alone, p) for p in parts[1:]]
            try:
                outs = [self.module(parts[0])]
            finally:
                for f in futs:  # every part ends before the thread settings are restored
                    f.exception()
            return torch.cat(outs + [f.result() for f in futs])
        finally:
            KT.set_serial(prev)
            torch.set_num_threads(nt)

    def _run_alone(self, x: Tensor) -> Tensor:
        torch.set_num_threads(1)  # this worker's PyTorch threads (its kernels run serially already)
        return self._run(x)

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


def _call(model: nn.Module, example: Any) -> Any:
    """``model(example)``; a tuple is positional arguments, a dict keyword arguments."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def flat_tensors(out: Any) -> list[Tensor]:
    """The tensors of a (nested) output in order: tuples, lists, dicts and ``ModelOutput``s."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    return []


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
            ref = _call(model, example)
    finally:
        for h in hooks:
            h.remove()
    return seen, ref


def _check_fused_codes(pm: _PackedBase, x: Tensor) -> bool:
    """True when the kernel's fused quantization (unsigned, or the signed formula of mode 2) gives
    the quantizer's encode codes."""
    q = input_quantizer_of(pm)
    if pm.act.mode not in (0, 2) or q is None:
        return True
    with torch.no_grad():
        ref = q.encode(x).codes.to(torch.int64).numpy()
    xf = x.contiguous().float().numpy()
    got = K.quantize_codes(xf, pm.act.hi, pm.act.mult) if pm.act.mode == 0 else spec_codes(pm.act, xf)
    return bool(np.array_equal(ref, got.astype(np.int64)))


def input_quantizer_of(pm: _PackedBase):
    return pm.__dict__.get("act_quantizer")


def compile(
    model: nn.Module,
    example_input: Any = None,
    *,
    fuse: bool = True,
    check: bool = True,
    batch_chunk: int | None = None,
) -> PackedModel:
    """Compile a quantized model (output of :func:`lowbit.quantize`) into packed inference.

    ``example_input`` is one batch of inputs (any batch size; a tuple is positional arguments, a
    dict keyword arguments); it traces shapes, finds the layers that run as modules, checks the
    fused activation quantizers and measures ``max_abs_diff``/``max_rel_diff`` against the
    fake-quantized model over every tensor of its output (tuples, dicts, ``ModelOutput``).
    ``check=False`` skips that measurement. A model without quantized layers is a ``ValueError``;
    a quantized layer whose forward the model never calls (``MultiheadAttention.out_proj``, whose
    weight attention reads directly) stays in PyTorch, listed with that reason.
    The model itself is not modified (a copy is compiled).

    ``batch_chunk``: run large batches in chunks of this many samples (see :class:`PackedModel`);
    None chooses from the activation sizes on ``example_input`` for models with int8
    convolutions and small weights, after checking that chunking does not change the output
    (samples are independent); 0 switches chunking off.

    ``example_input=None``: the model must be traceable by ``torch.fx``; the layers the graph
    calls are packed, the fused activation quantizers are not checked against ``encode`` on
    data, nothing is measured and batches
    are not chunked (unless ``batch_chunk`` says so). A Linear followed by a BatchNorm1d keeps
    the batch norm in PyTorch (the input rank is unknown).

    Bad inputs: an ``example_input`` the model itself fails on is a ``ValueError`` naming the
    example, the model's error and one sample the model runs on (a tuple of ints: a ``TypeError``,
    a tensor is expected, not a shape). With one tensor as ``example_input``, a call on one argument
    takes a tensor (or array; anything else is a ``TypeError``); where the example is floating
    point, other float dtypes are converted to its dtype and integer or bool inputs are a
    ``ValueError`` (the flat executor rejects them too, with or without an example).

    NaN and infinity: a call on an input holding NaN or +/-Inf is a ``ValueError`` on every path (the
    packed kernels would quantize such a value to a valid code, NaN to code 0, where the
    fake-quantized model gives NaN). Call it only after other threads have stopped running PyTorch
    models, or before they start: torch.fx, which traces the model, patches ``nn.Module.__call__``
    for the whole process while it traces. A model with NaN or +/-Inf in a parameter or buffer it
    packs (weights, biases, activation clip values such as PACT's alpha, BatchNorm statistics: a
    diverged training run) is a ``ValueError`` naming the layer and tensor. In ``max_abs_diff`` a NaN
    on either side counts as an infinite difference.

    float16 / bfloat16 models (floating parameters of that dtype, or without parameters a tensor
    example of it) compute in float32 and return a tensor output in their dtype, as the
    fake-quantized model does; other models return float32.
    """
    refresh_rnn_weights(model)
    src = copy.deepcopy(model).eval()
    if isinstance(example_input, np.ndarray):
        example_input = torch.from_numpy(example_input)
    if not quantized_layers(src):
        raise ValueError(
            f"{type(model).__name__} has no quantized layer: runtime.compile packs the layers that "
            "lowbit.quantize(model, recipe) quantized; quantize it first (or run the float model as it is)"
        )
    _check_finite_state(src)
    qlayers = quantizable_layers(src)
    # every quantized layer's input is recorded: a layer not called on the example (attention
    # reads MultiheadAttention.out_proj.weight directly) must stay a module
    has_example = example_input is not None
    try:
        inputs, ref = _record_inputs(src, qlayers, example_input) if has_example else ({}, None)
    except Exception as e:
        raise _example_error(src, example_input, e) from e
    traced = True
    try:
        graph = _LeafTracer({id(m) for m in qlayers.values()}).trace(src)
    except Exception as e:
        if not has_example:
            raise ValueError(
                f"torch.fx cannot trace {type(model).__name__} ({e}); pass example_input (one batch of "
                "inputs) so that the layers the model calls can be found by running it"
            ) from e
        log.warning("runtime: torch.fx could not trace the model (%s); packing without fusion", e)
        traced = False
    called = set(inputs) if has_example else set(qlayers)
    if traced:
        called &= {str(n.target) for n in graph.nodes if n.op == "call_module"}
    reports: list[LayerReport] = []
    packed: dict[str, _PackedBase] = {}
    for name, layer in qlayers.items():
        try:
            if name not in called:
                raise NotPackableError(
                    "its forward is not called on the example input or in the traced graph (its parent "
                    "reads the weight directly, e.g. MultiheadAttention.out_proj); it runs in PyTorch"
                )
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
    gm = fx.GraphModule(src, graph) if traced else src
    executor = chain = None
    if traced:
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in packed:
                _set_submodule(gm, node.target, packed[node.target])
        if fuse:
            _fuse(gm, packed)
            _fuse_int8(gm, packed)
            _link_tiles(gm, packed)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        _bind_forwards(gm)
        executor = FlatExecutor(gm) if fuse else None
        chain = _chain_of(gm)
    else:
        for name, pm in packed.items():
            _set_submodule(gm, name, pm)
    for name, pm in packed.items():
        reports.append(LayerReport(name, "packed", pm.describe()))
    order = {n: i for i, n in enumerate(qlayers)}
    reports.sort(key=lambda r: order.get(r.name, 0))
    out = PackedModel(gm, reports, traced)
    out.executor = executor
    out.chain = chain if traced else None
    if isinstance(example_input, Tensor):
        out.input_dtype = example_input.dtype
    out.output_dtype = _half_dtype(src, example_input)
    if not has_example:
        out.batch_chunk = int(batch_chunk or 0)
        return out
    if check:
        got = _call(out, example_input)
        _measure(out, ref, got)
        if out.max_rel_diff > 1e-3 and isinstance(ref, Tensor) and isinstance(got, Tensor):
            _explain_difference(out, src, example_input, got)
    # whether samples are independent: run once, for the chunking or the split that asks first
    independent = functools.cache(lambda: _independent(out, example_input))
    if batch_chunk is None:
        batch_chunk = _auto_chunk(packed, inputs, example_input, independent) if traced else 0
    out.batch_chunk = int(batch_chunk)
    if not out.batch_chunk:
        out.split_work = _split_work(packed, inputs, example_input, independent)
    return out


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, (tuple, list)):
        inner = ", ".join(_describe(v) for v in x[:4]) + (", ..." if len(x) > 4 else "")
        return f"{type(x).__name__} of {len(x)}: {inner}" if x else f"empty {type(x).__name__}"
    if isinstance(x, dict):
        return "dict of " + ", ".join(f"{k}={_describe(v)}" for k, v in list(x.items())[:4])
    return repr(x) if isinstance(x, (int, float)) else type(x).__name__


# spatial sizes tried (square) for the example of a conv net's error message
_HINT_SIZES = (28, 32, 224, 64, 96, 11, 16)


def _example_hint(model: nn.Module) -> str:
    """``torch.randn(...)`` of one sample the model runs on: from its first Conv2d (square sizes of
    _HINT_SIZES, the first the model runs on) or Linear layer; '' when that is not known."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    dt = "" if dtype is torch.float32 else f", dtype={dtype}"
    if isinstance(first, nn.Linear):
        return f"torch.randn(1, {first.in_features}{dt})"
    if not isinstance(first, nn.Conv2d):
        return ""
    c = first.in_channels
    for size in _HINT_SIZES:
        try:
            with torch.no_grad():
                model(torch.zeros(1, c, size, size, dtype=dtype))
        except Exception:  # a size the model does not take: try the next one
            continue
        return f"torch.randn(1, {c}, {size}, {size}{dt})"
    return f"torch.randn(1, {c}, H, W{dt})"


def _example_error(model: nn.Module, example: Any, cause: Exception) -> Exception:
    """The error for an ``example_input`` the (fake-quantized) model fails on: what was passed,
    the model's own error, and what to pass instead."""
    hint = _example_hint(model)
    if isinstance(example, tuple) and example and all(isinstance(v, int) for v in example):
        return TypeError(
            f"compile: example_input is a tuple of ints {example}, which the model takes as "
            f"{len(example)} positional arguments ({cause}); a tensor is expected, not a shape: "
            f"e.g. torch.randn{example}" + (f" (one sample this model runs on: {hint})"
                                            if hint and hint != f"torch.randn{example}" else "")
        )
    return ValueError(
        f"compile: the model failed on example_input ({_describe(example)}): {cause}; pass one batch "
        "the model itself accepts" + (f", e.g. {hint}" if hint else "")
    )


def _half_dtype(model: nn.Module, example: Any) -> torch.dtype | None:
    """float16 or bfloat16 where the model's floating parameters (or, without any, a tensor example)
    have that dtype: the dtype the fake-quantized model answers in."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dt = p.dtype if p is not None else example.dtype if isinstance(example, Tensor) else None
    return dt if dt in (torch.float16, torch.bfloat16) else None


def _check_finite_state(model: nn.Module) -> None:
    """Refuse NaN or +/-Inf in what is packed: the parameters and buffers of the quantized layers
    (weights, biases, activation clip values such as PACT's alpha) and of BatchNorms (folded into
    them). Such a model comes from a diverged run; packed, NaN would become finite codes."""
    mods = dict(quantizable_layers(model))
    mods.update((n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    for name, mod in mods.items():
        for tname, t in [*mod.named_parameters(), *mod.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
                bad = int(t.numel() - torch.isfinite(t.detach()).sum())
                raise ValueError(
                    f"compile: layer '{name}': {tname} holds NaN or infinity ({bad} of {t.numel()} values), "
                    "e.g. from a diverged training run; the packed model would not compute what the "
                    "model does: compile a model whose parameters and buffers are finite"
                )


def _measure(pm: PackedModel, ref: Any, got: Any) -> None:
    """max_abs_diff / max_rel_diff over every floating tensor of a (nested) output."""
    r, g = flat_tensors(ref), flat_tensors(got)
    if len(r) != len(g) or not r or any(a.shape != b.shape for a, b in zip(r, g, strict=True)):
        log.warning("runtime: the packed model's output does not have the structure of the model's "
                    "(%d vs %d tensors); no accuracy check", len(g), len(r))
        return
    abs_d, scale = 0.0, 0.0
    for a, b in zip(r, g, strict=True):
        if not a.is_floating_point() or a.numel() == 0:
            if not torch.equal(a, b):
                abs_d = float("inf")
            continue
        a64, b64 = a.double(), b.double()
        # equal values (infinities included) differ by 0; NaN on either side by infinity (Python's
        # max(0.0, nan) is 0.0: a NaN must not reach it)
        d = torch.where(a64 == b64, 0.0, (a64 - b64).abs()).nan_to_num(nan=math.inf, posinf=math.inf).max()
        abs_d = max(abs_d, float(d))
        scale = max(scale, float(a64.abs().nan_to_num(nan=0.0, posinf=0.0).max()))
    pm.max_abs_diff = abs_d
    pm.max_rel_diff = abs_d / max(scale, 1e-12)
    if pm.max_rel_diff > 1e-3:
        log.warning("runtime: packed output differs from the fake-quantized model by %.3g (relative %.3g)",
                    pm.max_abs_diff, pm.max_rel_diff)


def _decode_weight_fp64(enc: Encoded) -> Tensor:
    """``sw[o] * (l0 + u * q)`` in float64, the integer form the packed layers use (uniform levels
    from their end points, not the float32-rounded codebook), or ``levels[codes] * scale``."""
    try:
        wp = decompose_weight(enc)
    except NotPackableError:
        w = enc.levels.double()[enc.codes.long()] * enc.scale.double()
        for b in enc.branches:
            w = w + b.levels.double()[b.codes.long()] * b.scale.double()
        return w
    q = torch.from_numpy(plane_integers(wp)).double()
    sw = torch.from_numpy(wp.sw).double()[:, None]
    return (sw * (wp.l0 + wp.u * q)).reshape(enc.codes.shape)


class _Const(nn.Module):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x: Tensor) -> Tensor:
        return self.value


class _DecodeFp64(nn.Module):
    """An activation quantizer as the runtime applies it: codes from the float32 input with the
    float32 quantizer, values ``levels[codes] * scale`` in float64 (exact)."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.q = q  # float32

    def forward(self, x: Tensor) -> Tensor:
        enc = self.q.encode(x.float())
        out = enc.levels.double()[enc.codes.long()] * enc.scale.double()
        for b in enc.branches:
            out = out + b.levels.double()[b.codes.long()] * b.scale.double()
        return out


def reference_fp64(model: nn.Module, x: Tensor) -> Any:
    """The fake-quantized ``model`` (a copy) in float64 with the quantized values decoded exactly:
    the integer arithmetic of the packed runtime, up to float64 rounding (~1e-16).

    Weights are ``levels[codes] * scale`` of the layer's weight encoding (``encode_weight``: the
    stored one of a loaded layer), in float64; activation
    codes come from the float32 quantizer on the float32-rounded input, their values again in
    float64; the output of every ``nn.ReLU`` (what the runtime keeps in float32, e.g. a residual
    block's output) is rounded to float32. The float32 fake-quantized model is not this reference:
    its convolutions round at ~1e-7, and a pre-activation that close to a quantizer's rounding
    boundary takes the neighbouring code (a plain float64 run differs the same way, by quantizing
    weights and activations in float64)."""
    src = copy.deepcopy(model).eval()
    layers = quantizable_layers(src)
    weights: dict[str, Tensor] = {}
    acts: dict[str, nn.Module] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            if weight_quantizer(layer) is not None:  # the codes the packed layer holds
                weights[name] = _decode_weight_fp64(encode_weight(layer))
            q = input_quantizer(layer)
            if q is not None:
                acts[name] = _DecodeFp64(copy.deepcopy(q).float())
    ref = src.double()
    for name, layer in layers.items():
        if name in weights:
            # (not parametrize.remove_parametrizations: it deletes the weight property from the
            # parametrized class, which the copy shares with the original model)
            plist = layer.parametrizations.weight  # type: ignore[union-attr]
            plist[0] = _Const(weights[name])
            for i in range(1, len(plist)):
                plist[i] = nn.Identity()
        if name in acts:
            layer.input_quantizer = acts[name]

    def round_output(mod: nn.Module, args: tuple, out: Any) -> Any:
        return out.float().double() if isinstance(out, Tensor) and out.is_floating_point() else out

    for m in ref.modules():
        if type(m) is nn.ReLU or is_global_avgpool(m):
            m.register_forward_hook(round_output)
    with torch.no_grad():
        return ref(x.double())


def _explain_difference(pm: PackedModel, src: nn.Module, example: Tensor, got: Tensor) -> None:
    """The packed output differs from the float32 fake-quantized model: compare with
    :func:`reference_fp64` (float32 convolutions round, the packed kernels sum integers exactly,
    so a value within rounding of an activation quantizer's boundary can take another code)."""
    try:
        ref64 = reference_fp64(src, example)
        pm.max_rel_diff_fp64 = float((got.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-12))
    except Exception as e:  # a model that cannot run in float64
        log.debug("runtime: no float64 reference (%s)", e)
    if pm.max_rel_diff_fp64 < 1e-5:
        log.info(
            "runtime: packed model differs from the float32 fake-quantized model by %.3g (relative %.3g) "
            "but matches it in float64 (relative %.3g): activation codes at float32 rounding boundaries",
            pm.max_abs_diff, pm.max_rel_diff, pm.max_rel_diff_fp64,
        )
    else:
        log.warning(
            "runtime: packed model differs from the fake-quantized model by %.3g (relative %.3g; "
            "float64 model: %.3g)", pm.max_abs_diff, pm.max_rel_diff, pm.max_rel_diff_fp64,
        )


def _auto_chunk(
    packed: dict[str, _PackedBase], inputs: dict[str, Tensor], example: Any, independent: Callable[[], bool]
) -> int:
    """A batch chunk for conv nets with int8 layers and small weights (0: none): the largest
    power of two whose largest layer input stays within CHUNK_BYTES, checked on the example."""
    convs = [m for m in packed.values() if type(m) is PackedConv2d and m.i8 is not None]
    if not convs or not isinstance(example, Tensor) or example.dim() == 0 or not inputs:
        return 0
    if sum(m.i8.nbytes for m in packed.values() if m.i8 is not None) > (2 << 20):
        return 0  # weight-bound: every chunk would stream the weights again
    per_sample = max(4 * t.numel() / max(int(t.shape[0]), 1) for t in inputs.values() if t.dim() > 0)
    chunk = 8
    while chunk * 2 * per_sample <= CHUNK_BYTES and chunk < 256:
        chunk *= 2
    return chunk if independent() else 0


def _split_work(
    packed: dict[str, _PackedBase], inputs: dict[str, Tensor], example: Any, independent: Callable[[], bool]
) -> tuple[int, int] | None:
    """``PackedModel.split_work``: per sample, the output rows of the packed layers (a Linear
    layer's leading dimensions, a convolution's pixels; the fewest of any layer) and their
    multiply-adds (rows x outputs x reduction length, all layers), where the samples are
    independent; None otherwise."""
    if not isinstance(example, Tensor) or example.dim() == 0 or example.shape[0] == 0:
        return None
    B = int(example.shape[0])
    rows, macs = [], 0
    for name, t in inputs.items():
        m = packed.get(name)
        if m is None or t.dim() < 2 or t.shape[0] != B:
            continue
        if isinstance(m, PackedConv2d):
            if t.dim() != 4:
                return None
            r = math.prod(m.out_hw(int(t.shape[2]), int(t.shape[3])))
        else:
            r = t.numel() // (B * max(int(t.shape[-1]), 1))
        rows.append(r)
        macs += r * m.out_features * m.wp.K
    if not rows or min(rows) < 1 or not independent():
        return None
    return min(rows), macs


def _independent(pm: PackedModel, example: Tensor) -> bool:
    """Whether the samples of a batch are independent: a two-sample batch run whole and in halves
    gives one tensor output, the same up to rounding."""
    xv = example if example.shape[0] >= 2 else torch.cat([example, example.flip(-1)])
    try:
        with torch.inference_mode():
            whole = pm.module(xv)
            parts = pm._forward_chunked(xv, 1, chunk=max(int(xv.shape[0]) // 2, 1))
    except Exception as e:  # any failure means: do not chunk
        log.info("runtime: a batch is neither chunked nor split over threads (%s)", e)
        return False
    if not isinstance(whole, Tensor) or whole.shape != parts.shape:
        return False
    tol = 1e-5 * max(float(whole.abs().max()), 1e-12) if whole.numel() else 0.0
    if whole.numel() and float((whole.float() - parts.float()).abs().max()) > tol:
        log.info("runtime: a batch is neither chunked nor split over threads (samples are not independent)")
        return False
    return True


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
            ok = (type(pm) is PackedConv2d and type(bn) is nn.BatchNorm2d) or (
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



_ADDS = (operator.add, operator.iadd, torch.add)


def _calls(gm: fx.GraphModule) -> dict[str, int]:
    n: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            n[str(node.target)] = n.get(str(node.target), 0) + 1
    return n


def _int8_conv(gm: fx.GraphModule, node: fx.Node, packed: dict[str, _PackedBase], calls: dict[str, int]
               ) -> PackedConv2d | None:
    """The int8 PackedConv2d that ``node`` calls, if it is called from this one place only."""
    if node.op != "call_module" or str(node.target) not in packed or calls.get(str(node.target)) != 1:
        return None
    pm = packed[str(node.target)]
    return pm if type(pm) is PackedConv2d and pm.i8 is not None else None


def _is_flatten(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """``node`` flattens ``src`` from dimension 1 on (nn.Flatten(), torch.flatten(x, 1))."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1 and node.args == (src,)
    if node.op == "call_function" and node.target is torch.flatten:
        args = tuple(node.args) + tuple(node.kwargs.get(k) for k in ("start_dim",) if k in node.kwargs)
        return args[:1] == (src,) and tuple(args[1:]) == (1,) and set(node.kwargs) <= {"start_dim"}
    return False


def _fuse_int8(gm: fx.GraphModule, packed: dict[str, _PackedBase]) -> None:
    """Residual additions into int8 epilogues, then producer -> consumer code links (see the
    module docstring, step 4b)."""
    calls = _calls(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # 1. y = relu(conv(x) + other) -> conv(x, other) with the addition and the ReLU fused
    for node in list(gm.graph.nodes):
        pm = _int8_conv(gm, node, packed, calls)
        if pm is None or pm.relu or pm.residual or len(node.args) != 1 or node.kwargs or len(node.users) != 1:
            continue
        add = next(iter(node.users))
        is_add = (add.op == "call_function" and add.target in _ADDS) or (
            add.op == "call_method" and add.target in ("add", "__add__"))
        if not is_add or add.kwargs or len(add.args) != 2:
            continue
        a, b = add.args
        other = b if a is node else a if b is node else None
        if not isinstance(other, fx.Node) or other is node or order[other] > order[node]:
            continue
        node.args = (node.args[0], other)
        pm.residual = True
        pm.fused.append("add")
        add.replace_all_uses_with(node)
        gm.graph.erase_node(add)
        users = list(node.users)
        if len(users) == 1 and _is_relu(gm, users[0]) and users[0].args[0] is node:
            pm.fuse_relu()
            users[0].replace_all_uses_with(node)
            gm.graph.erase_node(users[0])
    # 2. global average pooling of an int8 layer's output: NHWC, float64 sums
    n_gap = 0
    for node in list(gm.graph.nodes):
        if _int8_conv(gm, node, packed, calls) is None:
            continue
        for u in list(node.users):
            if (u.op == "call_module" and u.args == (node,) and not u.kwargs
                    and is_global_avgpool(gm.get_submodule(str(u.target)))):
                name = f"_lowbit_avgpool{n_gap}"
                n_gap += 1
                gm.add_submodule(name, GlobalAvgPool2d())
                u.target = name
    # 3. code links: the producer quantizes its output for an int8 consumer
    n_pool = 0
    for node in list(gm.graph.nodes):
        pm = _int8_conv(gm, node, packed, calls)
        if pm is None:
            continue
        link = None
        for u in node.users:
            cons = _int8_conv(gm, u, packed, calls)
            if cons is not None and cons.act.mode == 0 and u.args[0] is node and node not in u.args[1:]:
                link = (u, None, cons, None)
                break
            if (u.op == "call_module" and calls.get(str(u.target)) == 1 and u.args == (node,) and not u.kwargs
                    and code_poolable(gm.get_submodule(str(u.target))) and len(u.users) == 1):
                v = next(iter(u.users))
                cons = _int8_conv(gm, v, packed, calls)
                if cons is not None and cons.act.mode == 0 and v.args[0] is u and u not in v.args[1:]:
                    link = (u, v, cons, None)
                    break
                # pool -> flatten -> Linear: the pool writes the Linear layer's rows
                if _is_flatten(gm, v, u) and len(v.users) == 1:
                    z = next(iter(v.users))
                    lin = packed.get(str(z.target)) if z.op == "call_module" else None
                    if (isinstance(lin, PackedLinear) and calls.get(str(z.target)) == 1 and lin.act.mode == 0
                            and z.args == (v,) and not z.kwargs):
                        link = (u, z, lin, v)
                        break
        if link is None:
            continue
        u, v, cons, flat = link
        if v is None:
            pm.code_target = CodeTarget(cons.act.hi, cons.act.mult, cons.padding)
        else:  # through a max pool, which then writes the consumer's padded image / rows
            pm.code_target = CodeTarget(cons.act.hi, cons.act.mult, (0, 0))
            name = f"_lowbit_code_pool{n_pool}"
            n_pool += 1
            pad = (0, 0) if flat is not None else cons.padding
            pool = CodeMaxPool2d(gm.get_submodule(str(u.target)), CodeTarget(cons.act.hi, cons.act.mult, pad),
                                 flat=flat is not None)
            gm.add_submodule(name, pool)
            u.target = name
            if flat is not None:
                v.replace_input_with(flat, u)
                gm.graph.erase_node(flat)
        pm.fused.append("codes")
        float_users = [w for w in node.users if w is not u]
        pm.emit_float = bool(float_users)
        if float_users:
            with gm.graph.inserting_after(node):
                y = gm.graph.call_function(operator.getitem, (node, 0))
            with gm.graph.inserting_after(y):
                c = gm.graph.call_function(operator.getitem, (node, 1))
            for w in float_users:
                w.replace_input_with(node, y)
            u.replace_input_with(node, c)


def _link_tiles(gm: fx.GraphModule, packed: dict[str, _PackedBase]) -> None:
    """Linear -> Linear on AMX (or VNNI) tiles: a packed Linear layer whose only user is another
    packed Linear layer on the same rows (called once, both running ``kernels_amx`` from some row
    count, the fused input formula) writes that layer's codes in the tile layout from its epilogue
    (:class:`CodeTiles`), from as many rows as the consumer runs on the tiles: the float output
    between them and the consumer's quantizing pass are skipped
    (``benchmarks/results/ab_tile_links.md``). Fewer rows, and rows with leading dimensions (an
    input of more than 2 dimensions; input_ndim 0 = unknown), go as floats, as before."""
    calls = _calls(gm)
    for node in gm.graph.nodes:
        p = packed.get(str(node.target)) if node.op == "call_module" else None
        if (not isinstance(p, PackedLinear) or p.amx is None or p.code_target is not None
                or p.input_ndim not in (0, 2) or calls.get(str(node.target)) != 1 or len(node.users) != 1):
            continue
        u = next(iter(node.users))
        c = packed.get(str(u.target)) if u.op == "call_module" else None
        if (isinstance(c, PackedLinear) and c.amx is not None and c.amx8 is None and c.act.mode == 0
                and u.args == (node,) and not u.kwargs and calls.get(str(u.target)) == 1
                and c.input_ndim in (0, 2) and c.in_features == p.out_features
                and KV.GEMV_MAX_ROWS < c.amx_min_rows < KA.NEVER_ROWS and p.amx_min_rows < KA.NEVER_ROWS):
            p.tile_target = TileTarget(c.act.hi, c.act.mult, c.amx_min_rows)
            p.fused.append("tiles")


def _bind_forwards(gm: fx.GraphModule) -> None:
    """Call the runtime's own modules (packed layers, code pools) through their bound ``forward``,
    kept in the GraphModule's ``__dict__``: no ``nn.Module.__call__`` (hooks) and no
    ``Module.__getattr__`` chain per call, which is a third of the time of ResNet-20 at batch 1.
    The modules stay registered where they were (``named_modules``, ``state_dict``)."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        ours = (_PackedBase, CodeMaxPool2d, GlobalAvgPool2d)
        if not isinstance(mod, ours) or mod._forward_hooks or mod._forward_pre_hooks:
            continue
        name = f"_lowbit_fwd{n}"
        n += 1
        object.__setattr__(gm, name, mod.forward)
        with gm.graph.inserting_before(node), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a get_attr of a plain attribute (the bound method)
            fn = gm.graph.get_attr(name)
            call = gm.graph.call_method("__call__", (fn, *node.args), dict(node.kwargs))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    if n:
        gm.recompile()


def _chain_of(gm: fx.GraphModule) -> tuple[Callable[[Any], Any], ...] | None:
    """The bound forwards (:func:`_bind_forwards`) of a graph that is one straight chain of the
    runtime's own modules, input -> f1 -> f2 -> ... -> output, each node used only by the next
    (an MLP of packed Linear layers with their ReLUs fused); None for any other graph."""
    fns: list[Callable[[Any], Any]] = []
    prev: fx.Node | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder" and prev is None:
            prev = node
        elif node.op == "get_attr" and str(node.target).startswith("_lowbit_fwd") and len(node.users) == 1:
            continue
        elif (node.op == "call_method" and node.target == "__call__" and not node.kwargs
              and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
              and str(node.args[0].target).startswith("_lowbit_fwd") and prev is not None
              and node.args[1] is prev and len(prev.users) == 1):
            fns.append(gm.__dict__[str(node.args[0].target)])
            prev = node
        elif node.op == "output" and fns and node.args == (prev,):
            return tuple(fns)
        else:
            return None
    return None
