"""The live model lifecycle: many served names, loaded on demand under a memory budget,
swapped without failing a request, with canaries, mirrors and an SLO fallback."""

from edgellm.server.lifecycle.manager import (
    FOREVER,
    Instance,
    Lease,
    Loader,
    ModelBudgetError,
    ModelLoadError,
    ModelTable,
    Policy,
    Prepared,
    Slot,
    version_key,
)

__all__ = [
    "FOREVER",
    "Instance",
    "Lease",
    "Loader",
    "ModelBudgetError",
    "ModelLoadError",
    "ModelTable",
    "Policy",
    "Prepared",
    "Slot",
    "version_key",
]
