"""Built-in recovery strategies, each a plugin registered like a third-party one (see ``plugins.py``)."""

from .clamp import ClampStrategy
from .guidance import GuidanceStrategy
from .rescale import RescaleStrategy
from .residual import ResidualStrategy
from .stream_rescale import StreamRescaleStrategy
from .upcast import UpcastStrategy

__all__ = [
    "ClampStrategy",
    "GuidanceStrategy",
    "RescaleStrategy",
    "ResidualStrategy",
    "StreamRescaleStrategy",
    "UpcastStrategy",
]
