"""One training step of a paper configuration on fake tensors: FLOPs by part and memory of one GPU.

Nothing here allocates an activation. The config's LightningModule is built on the ``meta`` device and moved
onto fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and storages, no data).
The batch is what the config's data module feeds one GPU: the method's own ``train_transform()`` applied to
one small synthetic image gives the keys and per-sample shapes; images become fake ``[batch, ...]`` tensors,
integer and boolean keys (pair ids, patch masks, a few kB) real ones. Then one step runs on the real module
code: ``training_step`` (bf16 autocast for ``bf16-mixed`` configs) and ``backward`` (:func:`measure_step`).

* FLOPs: the formulas of ``torch.utils.flop_counter`` (what ``FlopCounterMode`` counts: matmuls,
  convolutions, attention; elementwise work, normalisation and the optimiser step count 0), attributed to
  parts: in the forward to the innermost running module's part (the student backbone, the teachers, the
  loss modules; any other module is a head; outside every module, e.g. MoCo's logits against its queue,
  ``losses``), in the backward to the part whose forward created the autograd node that runs.
* Memory: every storage an operation creates is followed until its last reference (tensor, view or
  autograd-saved) goes, in the caching allocator's 512-byte blocks; the peak of the step is kept with its
  make-up: weights and buffers, the batch, activations (saved for backward and the backward's temporaries)
  and parameter gradients. Optimiser state and DDP's gradient buckets are added by the caller.

Three things a CPU would do differently from a GPU are done as a GPU does them:

* autocast runs on the CPU (fake CUDA tensors cannot run autograd without a GPU); the CPU and CUDA autocast
  lists agree on what dominates memory here (matmuls, convolutions and attention in bf16, the fp32 residual
  stream and normalisation inputs);
* ``F.scaled_dot_product_attention`` runs a GPU's kernels (:func:`cuda_attention`): with a mask or dropout
  the CPU takes the math path, which keeps the whole attention matrix;
* an operation whose output shape depends on values (boolean-mask indexing, ``unique``) takes its largest
  shape (:func:`largest_output`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch._subclasses.fake_tensor import (
    DynamicOutputShapeException,
    FakeTensorMode,
    is_fake,
    unset_fake_temporarily,
)
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

aten = torch.ops.aten
TEACHER_ATTRS = ("teacher_backbone", "teacher_projectors", "teacher_decoder")
TAG = "paper_cost_part"  # autograd-node metadata: the part whose forward created the node
LOSS_ATTRS = ("similarity_loss", "contrastive_loss", "asl", "swapped_prediction", "queues")


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode's formulas know the CUDA attention kernels; attention that still runs SDPA's CPU flash kernel
# (none in the methods' steps: see cuda_attention) costs the same matmuls.
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def fake_mode() -> FakeTensorMode:
    """Fake tensors; real inputs (the ``meta`` weights, small constants) are converted on first use."""
    return FakeTensorMode(allow_non_fake_inputs=True)


# ---------------------------------------------------------------------- building on meta, running on fake
def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with every tensor it creates on the ``meta`` device (no memory, no initialisation cost)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MVP's randomly initialised CLIP teacher warns by design (and logs)
        logging.disable(logging.WARNING)
        try:
            return factory()
        finally:
            logging.disable(logging.NOTSET)


def to_fake(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Parameters and buffers of a ``meta`` module as fake CPU tensors (``requires_grad`` kept)."""
    with mode:
        module.to_empty(device="cpu")
    return module


def synthetic_image(width: int = 320, height: int = 240) -> Image.Image:
    """A small deterministic RGB image: what a view transform is shown to learn its output's keys and shapes."""
    ramp = bytes((x * 7 + y * 3) % 256 for y in range(height) for x in range(width) for _ in range(3))
    return Image.frombytes("RGB", (width, height), ramp)


def transformed_sample(transform: Callable) -> dict[str, Tensor]:
    """One sample of ``transform`` applied to :func:`synthetic_image` (its tensors only; a few MB at most)."""
    torch.manual_seed(0)
    return {k: v for k, v in transform(synthetic_image()).items() if isinstance(v, Tensor)}


def paper_batch(sample: dict[str, Tensor], batch_size: int, mode: FakeTensorMode) -> dict[str, Tensor]:
    """``[batch_size, ...]`` of every key of ``sample``: images (floating point) as fake tensors; integer and
    boolean keys (block ids, patch masks: a few kB) as real copies of the sample's values, so that checks a
    method makes on them (BAM's pair ids) and masks keep their meaning."""
    batch = {}
    for key, value in sample.items():
        if value.is_floating_point():
            with mode:
                batch[key] = torch.empty((batch_size, *value.shape), dtype=value.dtype)
        else:
            batch[key] = value.unsqueeze(0).expand(batch_size, *value.shape).clone()
    return batch


# ---------------------------------------------------------------------- parts of a module
def default_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Student backbone, teachers and loss modules of a method or evaluation module (heads: all the rest)."""
    from ssl_zoo.models.backbones import Backbone

    student = getattr(model, "backbone", None)
    if not isinstance(student, nn.Module):
        student = next((m for m in model.modules() if isinstance(m, Backbone)), None)
    teachers = [getattr(model, a) for a in TEACHER_ATTRS if isinstance(getattr(model, a, None), nn.Module)]
    losses = [getattr(model, a) for a in LOSS_ATTRS if isinstance(getattr(model, a, None), nn.Module)]
    return {"student": [student] if student is not None else [], "teacher": teachers, "losses": losses}


def part_of_modules(model: nn.Module, parts: dict[str, list[nn.Module]]) -> dict[int, str]:
    """``id(module) -> part`` for every submodule: the named parts' modules and their descendants (the first
    part named wins a shared module), every other submodule of ``model`` a head."""
    owner = {id(m): "heads" for m in model.modules() if m is not model}
    for part in reversed(list(parts)):
        for root in parts[part]:
            owner.update({id(m): part for m in root.modules()})
    return owner


# ---------------------------------------------------------------------- optimiser state
def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimiser state the first step creates: buffers per parameter, by optimiser kind.

    SGD / LARS with momentum: one momentum buffer; Adam / AdamW: two moments (three with ``amsgrad``), plus a
    step counter each. ``tests/benchmarks/test_paper_cost.py`` checks this against a real optimiser's state after a step.
    """
    from ssl_zoo.utils.optim import LARS

    per_param = 0
    extra = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            size = p.numel() * p.element_size()
            if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
                per_param += size * (3 if group.get("amsgrad") else 2)
                extra += 4  # the float32 step counter
            elif isinstance(optimizer, torch.optim.SGD | LARS):
                per_param += size if group.get("momentum", 0) else 0
            else:
                raise TypeError(f"no optimiser-state rule for {type(optimizer).__name__}")
    return per_param + extra


# ---------------------------------------------------------------------- one step
@dataclass
class StepCost:
    """FLOPs of one step by part and direction, and the memory of one GPU in bytes."""

    flops: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> {"forward", "backward"}
    memory: dict[str, int] = field(default_factory=dict)  # weights, batch, activations, gradients, peak
    activations_by_part: dict[str, int] = field(default_factory=dict)  # at the peak

    @property
    def total_flops(self) -> int:
        return sum(v["forward"] + v["backward"] for v in self.flops.values())


def autocast_for(precision: str | None):
    """bf16 autocast for ``bf16-mixed`` (and ``bf16``), nothing for ``32-true`` / ``32`` / unset."""
    if precision and str(precision).startswith("bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision and str(precision).startswith("16"):
        return torch.autocast("cpu", dtype=torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings (``self.log()`` without a Trainer...), and CUDA's availability asked of the runtime:
    Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, under which every fake-tensor operation's
    ``torch.cuda.is_available()`` loads NVML anew (0.2 ms each, minutes over a paper-size step)."""
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if previous is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous


def cuda_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` through the kernel a GPU would pick: FlashAttention without a mask
    (bf16 / fp16, head dim <= 256), memory-efficient attention otherwise (a float bias, e.g. BEiT's relative
    position bias, whose gradient it returns). Both save only q, k, v, the output and the log-sum-exp."""
    if attn_mask is None and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
    bias = attn_mask
    if bias is not None:
        if bias.dtype == torch.bool:  # True = attend, as SDPA's boolean mask
            bias = torch.zeros_like(bias, dtype=query.dtype).masked_fill(~bias, float("-inf"))
        bias = bias.to(query.dtype).expand(*query.shape[:-2], query.shape[-2], key.shape[-2])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, grad, dropout_p, is_causal,
                                                       scale=scale)[0]


def largest_output(func, args: tuple, kwargs: dict):
    """The output of an operation whose shape depends on values, at its largest: every element selected,
    every value distinct (IA-CLoss keeps the anchors that have a positive, and in BAM's batches all do)."""
    if func is aten.nonzero.default:
        x = args[0]
        return x.new_empty((x.numel(), x.dim()), dtype=torch.long)
    if func is aten.masked_select.default:
        return args[0].new_empty(args[0].numel())
    if func is aten._unique2.default:
        x = args[0]
        return_inverse = args[2] if len(args) > 2 else kwargs.get("return_inverse", False)
        return_counts = args[3] if len(args) > 3 else kwargs.get("return_counts", False)
        return (x.new_empty(x.numel()), x.new_empty(x.shape if return_inverse else 0, dtype=torch.long),
                x.new_empty(x.numel() if return_counts else 0, dtype=torch.long))
    if func is aten.index.Tensor:  # boolean masks select every position they cover
        x, indices = args[0], list(args[1])
        shape, dim = [], 0
        for index in indices:
            if index is None:
                shape.append(x.shape[dim])
                dim += 1
            elif index.dtype == torch.bool:
                shape.append(index.numel())
                dim += index.dim()
            else:
                shape.extend(index.shape)
                dim += 1
        return x.new_empty((*shape, *x.shape[dim:]))
    if func in (aten.index_put_.default, aten._index_put_impl_.default):  # in place: the shape stays
        return args[0]
    if func is aten.index_put.default:
        return torch.empty_like(args[0])
    raise DynamicOutputShapeException(func)


@contextlib.contextmanager
def gpu_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` is :func:`cuda_attention` meanwhile (also where ``torch.nn.functional``
    calls it itself, as ``nn.MultiheadAttention`` does); on the CPU, dropout or a mask would send it down the
    math path, which keeps the whole attention matrix."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = cuda_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class _ForwardHooks(TorchFunctionMode):
    """Above autograd, for every function the forward calls: a function of real tensors only (the batch's ids
    and masks) runs on them for real, and every autograd node the call created is tagged with the part that
    created it, so that the backward's operations count to the same part (a pre-hook on each node names it)."""

    def __init__(self, profiler: StepProfiler) -> None:
        super().__init__()
        self.profiler = profiler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if tensors and not any(is_fake(t) for t in tensors):
            with unset_fake_temporarily():  # the batch's real ids and masks: checks on them keep working
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        part = self.profiler.forward_part()
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.grad_fn is not None:
                self._tag(t.grad_fn, part)
        return out

    def _tag(self, node, part: str) -> None:
        stack = [node]
        while stack:  # the nodes this call created: everything reachable and not tagged before
            node = stack.pop()
            if node is None or TAG in node.metadata:  # the tag lives on the node, not on its Python wrapper
                continue
            node.metadata[TAG] = part
            node.register_prehook(self.profiler.entering(part))
            stack.extend(next_node for next_node, _ in node.next_functions)


class StepProfiler(TorchDispatchMode):
    """FLOPs by (part, forward / backward) and the live bytes of the step, with their make-up at the peak.

    FLOPs: the formulas of ``torch.utils.flop_counter`` (what ``FlopCounterMode`` counts), attributed in the
    forward to the innermost running module's part (outside any module: ``losses``) and in the backward to
    the part whose forward created the autograd node being run.

    Memory: every storage an operation creates is followed until it is released (a finalizer on the storage,
    which fires when the last tensor, view or autograd-saved reference to it goes), rounded up to the caching
    allocator's 512-byte blocks. ``static`` bytes (weights, buffers, the batch) are alive throughout. A
    parameter's gradient moves from ``activations`` (where backward created it) to ``gradients`` when autograd
    accumulates it (``register_post_accumulate_grad_hook``).
    """

    BLOCK = 512

    def __init__(self, model: nn.Module, parts: dict[str, list[nn.Module]], static: dict[str, int]) -> None:
        super().__init__()
        self.registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in CPU_ATTENTION_FLOPS.items()}}
        self.owner = part_of_modules(model, parts)
        self.flops = {p: {"forward": 0, "backward": 0} for p in (*parts, "heads", "losses")}
        self.phase = "forward"
        self.backward_part = "losses"
        self.module_stack: list[str] = []
        self.static = dict(static)
        self.live = {"activations": 0, "gradients": 0}
        self.where: dict[int, tuple[str, int, str]] = {}  # id(storage) -> (category, bytes, part)
        self.live_parts = dict.fromkeys(self.flops, 0)  # activation bytes by the part that created them
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.parts_at_peak: dict[str, int] = {}
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._tagger = _ForwardHooks(self)

    # parts
    def forward_part(self) -> str:
        return self.module_stack[-1] if self.module_stack else "losses"

    def entering(self, part: str) -> Callable:
        def hook(grad_outputs):
            self.backward_part = part
        return hook

    def _push(self, module, args) -> None:
        self.module_stack.append(self.owner.get(id(module), self.forward_part()))

    def _pop(self, module, args, output) -> None:
        self.module_stack.pop()

    # memory
    def _size(self, storage) -> int:
        return -(-storage.nbytes() // self.BLOCK) * self.BLOCK

    def _release(self, key: int) -> None:
        category, size, part = self.where.pop(key)
        self.live[category] -= size
        if category == "activations":
            self.live_parts[part] -= size

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.where:
            return
        size = self._size(storage)
        part = self.forward_part() if self.phase == "forward" else self.backward_part
        self.where[key] = ("activations", size, part)
        self.live["activations"] += size
        self.live_parts[part] += size
        weakref.finalize(storage, self._release, key)
        total = sum(self.static.values()) + sum(self.live.values())
        if total > self.peak:
            self.peak, self.at_peak, self.parts_at_peak = total, {**self.static, **self.live}, dict(self.live_parts)

    def _gradient(self, param: Tensor) -> None:
        key = id(param.grad.untyped_storage())
        if key in self.where and self.where[key][0] == "activations":
            _, size, part = self.where[key]
            self.live["activations"] -= size
            self.live_parts[part] -= size
            self.live["gradients"] += size
            self.where[key] = ("gradients", size, part)

    # dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = self.registry.get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:  # as FlopCounterMode: a composite without a formula is counted through its decomposition
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            out = largest_output(func, args, kwargs)
        if formula is not None:
            part = self.forward_part() if self.phase == "forward" else self.backward_part
            self.flops[part][self.phase] += int(formula(*args, **kwargs, out_val=out))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._track(t)
        return out

    @contextlib.contextmanager
    def attached(self) -> Iterator[StepProfiler]:
        """The profiler with its module hooks, gradient hooks and autograd-node tagging in place."""
        handles = [register_module_forward_pre_hook(self._push), register_module_forward_hook(self._pop),
                   *(p.register_post_accumulate_grad_hook(self._gradient) for p in self._trainable)]
        try:
            with self._tagger, self:
                yield self
        finally:
            for handle in handles:
                handle.remove()


def storage_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors``, in 512-byte blocks."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[id(storage)] = -(-storage.nbytes() // StepProfiler.BLOCK) * StepProfiler.BLOCK
    return sum(seen.values())


def measure_step(model: nn.Module, inputs: list[Tensor], forward: Callable[[], Tensor], precision: str | None,
                 mode: FakeTensorMode, parts: dict[str, list[nn.Module]] | None = None) -> StepCost:
    """FLOPs (by part, forward / backward) and peak memory of ``forward()`` + ``backward()`` on fake ``model``.

    ``inputs``: the batch tensors. ``forward`` returns the scalar to back-propagate.
    """
    model.train()
    model.zero_grad(set_to_none=True)  # as the optimiser does before every step
    with mode, quiet():
        static = {"weights": storage_bytes([*model.parameters(), *model.buffers()]), "batch": storage_bytes(inputs)}
        profiler = StepProfiler(model, parts or default_parts(model), static)
        with profiler.attached(), gpu_attention():
            with autocast_for(precision):
                loss = forward()
            profiler.phase = "backward"
            loss.backward()
    return StepCost(flops=profiler.flops, memory={**profiler.at_peak, "peak": profiler.peak},
                    activations_by_part=profiler.parts_at_peak)
