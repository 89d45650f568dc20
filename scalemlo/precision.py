"""Low-precision levels: hypergradient evaluations in float32 at the level's own (rounded) parameters.

A difference quotient cannot be formed in bfloat16. A step eps*w below bf16's
spacing (8 significant bits, about 0.4 % of a parameter) rounds away, so the
perturbed point is not the one the quotient divides by, and a bf16 forward's
own rounding (relative 2^-8 per operation) does not cancel between the two
evaluations either: a finite-difference mixed product on a 3.7M GPT-2 came
out 58 % off in bf16 at radius 1e-2.

The rule here, for every method: while a hypergradient is taken, each
bf16/fp16 level's parameters are float32 copies of its low-precision
parameters (the values its forward uses), the evaluations (the owner's
objective, gradients, perturbed forwards) run in float32, and perturbations
move the float32 copies. Afterwards the low-precision tensors are put back
untouched. Where the optimizer keeps a float32 master of what is swapped
(DeepSpeed's bf16 optimizer at ZeRO-0: whole parameters; ZeRO-3: this rank's
partitions), the master itself is used, in place: no memory is added, and
every perturbation of it is restored exactly, as for any parameter. Else
(ZeRO 1-2, whose masters are partitioned across ranks; a torch backend) a
float32 copy of the parameter is made for the while. The hypergradient is
then the float32 hypergradient at the master (or at the bf16 point), at the
price of float32 arithmetic for the hypergradient's passes (gathered ZeRO-3
layers are float32 while in use). The training steps themselves stay in the level's
precision. ``tests/test_low_precision.py`` checks every method against the
float32 run of the same program (cosine >= 0.99).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Outside the innermost hypergradient: the autocast state, and the forwards Accelerate wrapped in autocast
# (``--bf16`` without DeepSpeed: ``model.forward`` runs under torch autocast, the plain one is kept as
# ``model._original_forward``); restored by native_autocast for a training forward taken inside one (the
# Trainer's shared forward).
_outside: list[tuple[list[tuple[str, bool, torch.dtype]], list[tuple[torch.nn.Module, Any]]]] = []


def _autocast_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _autocast_wrapped(module: torch.nn.Module) -> bool:
    return "_original_forward" in vars(module) and "forward" in vars(module)


@contextlib.contextmanager
def _switched(state, on: bool, forwards) -> Iterator[None]:
    """Autocast on (``on``) or off for each device enabled in ``state``, and each module's ``forward`` set
    to ``during`` for a while, then to ``after`` (``forwards``: (module, during, after))."""
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            if enabled:
                stack.enter_context(torch.autocast(device_type=device, dtype=dtype, enabled=on))
        for module, during, _ in forwards:
            module.forward = during
        try:
            yield
        finally:
            for module, _, after in forwards:
                module.forward = after


@contextlib.contextmanager
def without_autocast(modules: Sequence[torch.nn.Module] = ()) -> Iterator[None]:
    """Autocast off for a while, also inside ``modules`` whose forward Accelerate wrapped in autocast.

    For the hypergradient's evaluations: autocast would round every matmul to bf16, the precision the rule
    above avoids.

    Args:
        modules: modules whose forward Accelerate may have wrapped in autocast (their plain forward is used
            meanwhile).
    """
    state = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _autocast_devices()]
    wrapped = [(m, vars(m)["forward"]) for m in modules if _autocast_wrapped(m)]
    _outside.append((state, wrapped))
    try:
        with _switched(state, False, [(m, m._original_forward, forward) for m, forward in wrapped]):
            yield
    finally:
        _outside.pop()


def autocast_outside() -> bool:
    """Whether autocast was on outside the innermost `without_autocast`.

    A training forward taken inside the hypergradient runs in bf16 then, and cannot be differenced against a
    float32 one.
    """
    return bool(_outside) and (any(enabled for _, enabled, _ in _outside[-1][0]) or bool(_outside[-1][1]))


@contextlib.contextmanager
def native_autocast() -> Iterator[None]:
    """Inside `without_autocast`: the autocast state from outside it, for a training forward."""
    state, wrapped = _outside[-1] if _outside else ([], [])
    with _switched(state, True, [(m, forward, m._original_forward) for m, forward in wrapped]):
        yield


def is_low_precision(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a low precision (bf16 or fp16)."""
    return dtype in LOW_PRECISION


def precision_name(params: Sequence[torch.Tensor]) -> str:
    """The precision a level trains in, as ``Method.precisions`` names it.

    Args:
        params: the level's parameters.

    Returns:
        "bf16" or "fp16" when its floating-point parameters are of that dtype, else "fp32" (float32 and
        float64, the full precisions).
    """
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


class Float32Evaluation:
    """Swaps one module's low-precision parameters for float32 tensors, and back (exactly).

    Args:
        module: the module whose parameters are swapped.
        partitioned: the module's parameters are ZeRO-3 partitioned; their
            partitions (``p.ds_tensor``) are swapped, so DeepSpeed gathers float32
            layers (it gathers in the partition's dtype).
        release: re-partitions whatever ZeRO-3 keeps gathered (called before each swap, so no gathered
            low-precision copy outlives it).
        master: for a parameter, the optimizer's float32 master of what is swapped (the whole parameter,
            or at ZeRO-3 this rank's partition), or None; where there is one it is used in place (no memory;
            perturbations move it and are restored exactly, as they would move the parameter), else a
            float32 copy of the parameter is made.
    """

    def __init__(self, module: torch.nn.Module, partitioned: bool, release=lambda: None, master=lambda p: None):
        self.module = module
        self.partitioned = partitioned
        self.release = release
        self.master = master
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (tensor swapped, its own data)
        self._copies: list[torch.Tensor] | None = None  # the float32 tensors swapped in (kept while suspended)

    @property
    def low_precision(self) -> bool:
        """Whether any tensor to swap is of a low precision."""
        return any(is_low_precision(t.dtype) for _, t in self._targets())

    @property
    def active(self) -> bool:
        """Whether the float32 tensors are swapped in now."""
        return self._saved is not None

    def _targets(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(parameter, the tensor swapped for it): the parameter, or at ZeRO-3 its partition."""
        if self.partitioned:
            return [(p, p.ds_tensor) for p in self.module.parameters() if hasattr(p, "ds_tensor")]
        return [(p, p) for p in self.module.parameters()]

    def _float32_for(self, p: torch.nn.Parameter, own: torch.Tensor) -> torch.Tensor:
        master = self.master(p) if p.requires_grad else None
        if master is not None and master.dtype == torch.float32 and master.numel() == own.numel():
            return master.view(own.shape)
        return own.float()

    def _swap_in(self, copies: list[torch.Tensor] | None) -> None:
        self.release()
        saved, made = [], []
        targets = [(p, t) for p, t in self._targets() if is_low_precision(t.dtype)]
        for i, (p, t) in enumerate(targets):
            own = t.data
            copy = self._float32_for(p, own) if copies is None else copies[i]
            saved.append((t, own))
            made.append(copy)
            t.data = copy
        self._saved, self._copies = saved, made
        self._fix_released(torch.float32)

    def _swap_out(self) -> torch.dtype | None:
        self.release()
        dtype = None
        for t, own in self._saved or ():
            t.data = own
            dtype = own.dtype
        self._saved = None
        if dtype is not None:
            self._fix_released(dtype)
        return dtype

    def _fix_released(self, dtype: torch.dtype) -> None:
        # A released ZeRO-3 parameter is an empty tensor of the parameter's dtype; DeepSpeed sizes
        # gradient buffers by it, so it follows the partition's dtype.
        if self.partitioned:
            for p in self.module.parameters():
                if hasattr(p, "ds_tensor") and p.data.numel() == 0 and p.dtype != dtype:
                    p.data = torch.empty(0, dtype=dtype, device=p.device)

    @contextlib.contextmanager
    def float32(self) -> Iterator[None]:
        """The module in float32 for a while (re-entrant: an inner call changes nothing)."""
        if self.active or not self.low_precision:
            yield
            return
        self._swap_in(None)
        try:
            yield
        finally:
            self._swap_out()
            self._copies = None

    @contextlib.contextmanager
    def native(self) -> Iterator[None]:
        """Inside `float32`: the module's own low-precision parameters for a while (a training forward).

        The float32 copies come back afterwards, as they were.
        """
        if not self.active:
            yield
            return
        copies = self._copies
        self._swap_out()
        try:
            yield
        finally:
            self._swap_in(copies)
