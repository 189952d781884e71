"""Built-in recovery strategies; each implements ``guarded_diffusers.recovery.RecoveryStrategy``."""

from .upcast import UpcastStrategy

__all__ = ["UpcastStrategy"]
