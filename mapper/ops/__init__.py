"""The ops a rule can use. Each module holds one op and its inverse (or a pair of mutual inverses).

``ALL_OPS`` is the complete, explicit list: the rule format (``mapper.spec``) is built from it,
so adding an op means writing its class and adding it here, nowhere else.
"""

from mapper.ops.affine import Affine
from mapper.ops.base import NeedsResidual, Op, OpContext, ShapeError, all_bitwise_equal, bitwise_equal
from mapper.ops.drop_create import Create, Drop, Restore
from mapper.ops.rename import Rename
from mapper.ops.reshape import Flatten, Unflatten
from mapper.ops.slicing import Pad, Slice
from mapper.ops.split_fuse import Fuse, Split
from mapper.ops.transpose import Transpose

ALL_OPS: tuple[type[Op], ...] = (
    Rename, Transpose, Split, Fuse, Drop, Create, Unflatten, Flatten, Affine, Slice, Pad,
)
OPS_BY_NAME: dict[str, type[Op]] = {op.name: op for op in ALL_OPS}

__all__ = [
    "ALL_OPS", "OPS_BY_NAME", "Affine", "Create", "Drop", "Flatten", "Fuse", "NeedsResidual", "Op",
    "OpContext", "Pad", "Rename", "Restore", "ShapeError", "Slice", "Split", "Transpose", "Unflatten",
    "all_bitwise_equal", "bitwise_equal",
]
