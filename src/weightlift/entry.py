"""`offload()`, the one entry point: say how (a budget, a saved plan or a config), plan when asked, and
`apply`; a diffusers pipeline has its denoiser offloaded and its other modules moved whole."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import Adapter
from .apply import apply, move_to, refuse_offloaded
from .config import OffloadConfig, parse_size, resolve_device
from .distributed import agree, group_of
from .errors import OffloadError
from .hooks import OffloadHandle
from .inventory import unique_bytes
from .plan import Plan, check_plan
from .plan import plan as make_plan

DENOISERS = ("transformer", "unet", "prior", "decoder")


def _offload_pipeline(pipe, device, **how) -> OffloadHandle:
    """A diffusers pipeline: its denoiser (``transformer`` or ``unet``) is offloaded, its other modules
    (text encoders, VAE) go to the device whole; `remove()` puts every one back."""
    denoiser = next((getattr(pipe, n) for n in DENOISERS if isinstance(getattr(pipe, n, None), nn.Module)), None)
    if denoiser is None:
        names = ", ".join(f"`{k}`" for k, v in pipe.components.items() if isinstance(v, nn.Module)) or "none"
        raise OffloadError(
            f"`model` ({type(pipe).__name__}) is a pipeline without a `transformer` or `unet`: offload the component "
            f"that holds the layers (its modules: {names})"
        )
    handle = offload(denoiser, device=device, **how)
    try:
        others = {id(m): m for m in pipe.components.values() if isinstance(m, nn.Module) and m is not denoiser}
        tensors = {id(t): t for m in others.values() for t in (*m.parameters(), *m.buffers())}
        move_to(handle, list(tensors.values()), handle.device)
        handle.resident_bytes += unique_bytes([t for t in tensors.values() if type(t) in (torch.Tensor, nn.Parameter)])
    except BaseException:
        handle.remove()
        raise
    return handle


@torch.inference_mode(False)  # slots and masters must be normal tensors: the copy thread runs outside the mode
def offload(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    config: OffloadConfig | None = None,
    budget: int | str | None = None,
    plan: Plan | None = None,
    adapters: Sequence[Adapter] = (),
) -> OffloadHandle:
    """Stream ``model``'s layer stack through a fixed pool of device buffers; everything else goes to ``device``.

    Say how with one of: ``budget`` (device memory for weights, e.g. "6GiB": `weightlift.plan` measures
    and chooses), ``plan`` (a saved `Plan`, refused for another model or device) or ``config`` (explicit
    knobs; the default offloads every layer with prefetch step 1).
    Returns an `OffloadHandle`; ``handle.remove()`` (or leaving ``with offload(...)``) restores the model
    bit for bit. ``adapters`` teach it tensor types it cannot take apart by itself (`weightlift.adapters`).
    Raises `OffloadError`, leaving the model as it was, for anything that cannot work.
    May be called inside ``torch.inference_mode()``. A diffusers pipeline may be passed: its ``transformer``
    or ``unet`` is offloaded and its other modules go to ``device`` whole; for a budget, make the plan for
    the denoiser with a sample input (``plan(pipe.unet, budget=..., sample=...)``) and pass ``plan=``.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "components", None), dict):
        return _offload_pipeline(model, device, config=config, budget=budget, plan=plan, adapters=adapters)
    if not isinstance(model, nn.Module):
        raise OffloadError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    given = [name for name, v in (("config", config), ("budget", budget), ("plan", plan)) if v is not None]
    if len(given) > 1:
        raise OffloadError(f"pass one of `config`, `budget` or `plan`, not {' and '.join(f'`{g}`' for g in given)}")
    if config is not None and not isinstance(config, OffloadConfig):
        raise OffloadError(f"`config` must be a weightlift.OffloadConfig, got {type(config).__name__}")
    dev = resolve_device(device)
    refuse_offloaded(model)  # before planning, which would run the offloaded model
    group = group_of(model)  # tensor parallel: every rank must say the same (a collective, on every rank)
    if budget is not None:
        agree("budget", parse_size(budget, name="budget"), group)
    elif plan is not None:
        agree("plan", plan.config() if isinstance(plan, Plan) else type(plan).__name__, group)
    else:
        agree("config", config, group)
    if budget is not None:
        plan = make_plan(model, device=dev, budget=budget, adapters=adapters)
    if plan is not None:
        check_plan(plan, model, dev)
        config = plan.config()
    if config is None:
        config = OffloadConfig()
    return apply(model, dev, config, adapters, plan)
