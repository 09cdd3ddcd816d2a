"""The steps weightlift's hooks take, as custom ops that `torch.compile` keeps in the graph, in order.

``weightlift::wait(x, key)`` runs before an offloaded layer (its slot holds the layer's weights for
compute issued from now on); ``weightlift::prefetch(x, key)`` runs after it (the copy of the layer
``step`` positions ahead starts, after the compute that last read that slot). Both return nothing and
declare that they mutate ``x``: the layer's input for ``wait``, its output for ``prefetch``. They do not
touch ``x``; the declared mutation is the data dependency that orders them: every op of the layer that
reads its input (and through it the weights) runs after ``wait``, and ``prefetch`` runs after every op
that produced the output, and before anything downstream reads it. Without it the compiler would be
free to drop or move an op whose result nobody uses. The weights themselves are not arguments: the
layer's parameters are fixed views into its slot, graph inputs read when the compiled code runs.
A third op, ``weightlift::experts(x, index, key)``, runs before a MoE layer's experts compute on ``x``
with the router's choice ``index`` (`weightlift.expert_streams`): it moves the chosen experts into place,
and declares ``x`` mutated for the same reason.

Dynamo cannot trace the real work (a Python state machine, a copy thread, clocks, ``data_ptr``): it is
opaque inside the ops, so no graph break is needed. A custom op takes only tensors and scalars, so the
hook is named by an integer ``key`` into ``_HOOKS``, a module-level weak registry: the one piece of
global state in weightlift. It holds no strong reference (an entry goes away with its hooks, on
``remove()``), and keys are never reused, so a graph compiled for a removed handle fails with an
`OffloadError` instead of driving another model's slots.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

from .errors import OffloadError


class Steps(Protocol):
    def wait(self) -> None: ...

    def prefetch(self) -> None: ...


class Routes(Protocol):
    def route(self, x: torch.Tensor, index: torch.Tensor | None) -> None: ...


_HOOKS: weakref.WeakValueDictionary[int, Steps | Routes] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register(hook: Steps | Routes) -> int:
    """A fresh key naming ``hook`` to the ops, for as long as ``hook`` lives."""
    key = next(_KEYS)
    _HOOKS[key] = hook
    return key


def _hook(key: int) -> Any:  # a Steps or a Routes: each op calls the method its kind has
    hook = _HOOKS.get(key)
    if hook is None:
        raise OffloadError(
            f"weightlift op called for hook `{key}`, whose offloading was removed: a graph compiled while the "
            "model was offloaded still runs. Call `torch._dynamo.reset()` (or compile the model again) after "
            "`handle.remove()`"
        )
    return hook


@torch.library.custom_op("weightlift::wait", mutates_args=("x",))
def wait(x: torch.Tensor, key: int) -> None:
    """Make the offloaded layer named by ``key`` ready: ``x`` is its input (declared mutated, left as is)."""
    _hook(key).wait()


@wait.register_fake
def _(x: torch.Tensor, key: int) -> None:
    return None


@torch.library.custom_op("weightlift::prefetch", mutates_args=("x",))
def prefetch(x: torch.Tensor, key: int) -> None:
    """The layer named by ``key`` has run: start the copy ``step`` ahead. ``x`` is its output (left as is)."""
    _hook(key).prefetch()


@prefetch.register_fake
def _(x: torch.Tensor, key: int) -> None:
    return None


@torch.library.custom_op("weightlift::experts", mutates_args=("x",))
def experts(x: torch.Tensor, index: torch.Tensor | None, key: int) -> None:
    """The experts named by ``key`` are about to compute on ``x`` with the expert indices ``index``: move the
    chosen ones into place (`weightlift.expert_streams`). ``x`` is declared mutated, left as is."""
    _hook(key).route(x, index)


@experts.register_fake
def _(x: torch.Tensor, index: torch.Tensor | None, key: int) -> None:
    return None


def eagerly(step: Callable[[], None]) -> None:
    """``step()`` outside dynamo's trace, for a hook with no tensor to order an op on (called only while
    compiling): a deliberate graph break, rather than dynamo tracing into the bookkeeping and breaking on
    whatever it meets first. `torch.compiler.disable` is applied at the call, not at import: it imports
    dynamo, seconds of start-up for every command that never compiles."""
    torch.compiler.disable(step)()


def first_tensor(*values: Any) -> torch.Tensor | None:
    """The first tensor among ``values``, looking one level into tuples, lists and dicts (a layer's
    arguments or output): the activation that orders the ops."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, (tuple, list)):
            for item in v:
                if isinstance(item, torch.Tensor):
                    return item
        if isinstance(v, dict):
            for item in v.values():
                if isinstance(item, torch.Tensor):
                    return item
    return None
