"""A fake accelerator on the CPU, for the ``gpu`` tests (fakeaccel.cpp says what it is and what it catches).

`enable(mode)` compiles the extension (once: the build is cached under ``build/fakeaccel`` and redone only
when the source or the torch version changes), registers it as torch's PrivateUse1 backend under the name
`NAME`, and makes ``torch.accelerator`` report it. A process can enable it once; `set_mode` switches between
"sync" and "deferred" afterwards. The pytest option ``--fake-accelerator=MODE`` (tests/conftest.py) enables
it before collection, so the ``gpu``-marked tests run on it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

NAME = "fakeaccel"
MODES = ("sync", "deferred")
HERE = Path(__file__).resolve().parent
BUILD = HERE.parent.parent / "build" / "fakeaccel"

build_seconds: float | None = None  # how long the compile (or the load of a cached build) took


def enabled() -> bool:
    return torch._C._get_privateuse1_backend_name() == NAME


def _module():
    """What ``torch.fakeaccel`` answers (torch and libraries look up a device's module by its type)."""
    import types

    mod = types.ModuleType(NAME)
    mod.is_available = lambda: True
    mod.device_count = lambda: torch.ops.fakeaccel.device_count()
    mod.current_device = lambda: torch.accelerator.current_device_index()
    mod.set_device = lambda d: torch.accelerator.set_device_index(d)
    mod.synchronize = lambda device=None: torch.accelerator.synchronize(device)
    mod.memory_allocated = lambda device=None: torch.accelerator.memory_allocated(device)
    mod.max_memory_allocated = lambda device=None: torch.accelerator.max_memory_allocated(device)
    mod.reset_peak_memory_stats = lambda device=None: torch.accelerator.reset_peak_memory_stats(device)
    mod.mem_get_info = lambda device=None: torch.accelerator.get_memory_info(device)
    mod.empty_cache = lambda: None
    mod.is_initialized = lambda: True
    mod._is_in_bad_fork = lambda: False
    mod.manual_seed_all = lambda seed: None  # random ops run on the CPU kernels and generator
    mod.get_rng_state = lambda device=None: torch.get_rng_state()
    mod.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    return mod


def enable(mode: str = "sync") -> None:
    """Build (or load the cached build), register the device, and set ``mode``."""
    global build_seconds
    if mode not in MODES:
        raise ValueError(f"fake accelerator mode {mode!r}: use one of {MODES}")
    if enabled():
        set_mode(mode)
        return
    if torch._C._get_privateuse1_backend_name() != "privateuseone":
        raise RuntimeError(f"another PrivateUse1 backend is registered: {torch._C._get_privateuse1_backend_name()}")
    if torch.cuda.is_available():
        raise RuntimeError("a real accelerator is present: run the gpu tests on it, not on the fake one")
    from torch.utils import cpp_extension

    BUILD.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cpp_extension.load(
        name="weightlift_fakeaccel",
        sources=[str(HERE / "fakeaccel.cpp")],
        build_directory=str(BUILD),
        extra_cflags=["-O1"],
        is_python_module=False,
        verbose=os.environ.get("FAKEACCEL_VERBOSE") == "1",
    )
    build_seconds = time.perf_counter() - start
    torch.utils.rename_privateuse1_backend(NAME)
    torch._register_device_module(NAME, _module())
    torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)
    set_mode(mode)


def set_mode(mode: str) -> None:
    torch.ops.fakeaccel.set_mode(mode)


def mode() -> str:
    return torch.ops.fakeaccel.mode()


def set_capacity(nbytes: int, device: int = 0) -> None:
    """Device memory beyond ``nbytes`` raises ``torch.OutOfMemoryError``."""
    torch.ops.fakeaccel.set_capacity(device, nbytes)


def counters() -> dict[str, int]:
    """Since the last `reset_counters`: copies issued non-blocking from pageable host memory, copies queued
    (deferred mode), copies a flush ran, flushes that ran any."""
    pageable, queued, ran, flushes = torch.ops.fakeaccel.counters()
    return {"pageable_async_copies": pageable, "queued": queued, "ran": ran, "flushes": flushes}


def reset_counters() -> None:
    torch.ops.fakeaccel.reset_counters()


def pending() -> int:
    """Copies queued and not yet run."""
    return torch.ops.fakeaccel.pending()
