"""Errors a user can cause. The CLI turns every OffplanError into one line and exit code 2."""

from __future__ import annotations


class OffplanError(Exception):
    """Base class for errors caused by input, not by a bug. The message is shown as is."""


class SpecError(OffplanError):
    """A model description (model.yaml, config.json, GGUF header) is malformed or inconsistent."""


class HardwareError(OffplanError):
    """A hardware profile is malformed, missing a field, or physically impossible."""


class PlanError(OffplanError):
    """A plan file is malformed or does not match the model / profile it is used with."""


class InfeasiblePlanError(OffplanError):
    """No placement fits. The message names the resource that ran out and by how much."""

    def __init__(self, message: str, resource: str = "", needed_bytes: float = 0.0,
                 available_bytes: float = 0.0):
        super().__init__(message)
        self.resource = resource
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class SolverStoppedError(InfeasiblePlanError):
    """The solver stopped (time limit) before finding any plan: nothing is proven about fit."""

    def __init__(self, message: str):
        super().__init__(message, "solver time")
