"""chunkconv: convolutions whose kernel is a function of the input, chunked to fit a memory budget."""

from . import ops  # chunkconv.ops: the drop-in deformable convolutions
from ._version import __version__ as __version__
from .budget import format_bytes, parse_budget
from .errors import BatchCoupledGeneratorError, BudgetTooSmallError, ChunkConvError, GeneratorOutputError
from .functional import dynamic_conv, dynamic_conv1d, dynamic_conv2d, dynamic_conv3d, plan
from .memory import MemoryTracker
from .modules import DynamicConv, DynamicConv1d, DynamicConv2d, DynamicConv3d
from .planner import Plan
from .progress import set_progress
from .reference import dynamic_conv_reference

__all__ = [
    "BatchCoupledGeneratorError",
    "BudgetTooSmallError",
    "ChunkConvError",
    "DynamicConv",
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "GeneratorOutputError",
    "MemoryTracker",
    "Plan",
    "dynamic_conv",
    "dynamic_conv1d",
    "dynamic_conv2d",
    "dynamic_conv3d",
    "dynamic_conv_reference",
    "format_bytes",
    "ops",
    "parse_budget",
    "plan",
    "set_progress",
]
