"""chunkconv: convolutions whose kernel is a function of the input, chunked to fit a memory budget."""

from . import ops  # chunkconv.ops: the drop-in deformable convolutions
from ._version import __version__ as __version__
from .budget import format_bytes, parse_budget
from .errors import (
    BatchCoupledGeneratorError,
    BudgetTooSmallError,
    ChunkConvError,
    FastPathUnavailableError,
    GeneratorCallError,
    GeneratorOutputError,
    ShardedGeneratorError,
    UnsupportedError,
    UntrackedGradientError,
)
from .functional import dynamic_conv, dynamic_conv1d, dynamic_conv2d, dynamic_conv3d, plan
from .halo import ReceptiveField, TilePlan
from .memory import MemoryTracker
from .modules import DynamicConv, DynamicConv1d, DynamicConv2d, DynamicConv3d
from .planner import Plan
from .progress import set_progress
from .reference import dynamic_conv_reference
from .tile_layers import NotTileLocalError, receptive_field
from .tiling import tile_plan, tiled

__all__ = [
    "BatchCoupledGeneratorError",
    "BudgetTooSmallError",
    "ChunkConvError",
    "DynamicConv",
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "FastPathUnavailableError",
    "GeneratorCallError",
    "GeneratorOutputError",
    "MemoryTracker",
    "NotTileLocalError",
    "Plan",
    "ShardedGeneratorError",
    "UnsupportedError",
    "UntrackedGradientError",
    "ReceptiveField",
    "TilePlan",
    "dynamic_conv",
    "dynamic_conv1d",
    "dynamic_conv2d",
    "dynamic_conv3d",
    "dynamic_conv_reference",
    "format_bytes",
    "ops",
    "parse_budget",
    "plan",
    "receptive_field",
    "set_progress",
    "tile_plan",
    "tiled",
]
