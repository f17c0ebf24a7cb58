"""Converting checkpoint folders, on top of the engine: NeoX -> HF, HF -> NeoX, NeoX -> NeoX.

- :mod:`.options`: what a caller asks, validated once (an option that does not apply to the
  direction is an error);
- :mod:`.neox_side` / :mod:`.hf_side`: what each kind of folder says about its model, which rule
  set maps it, and what an output of that kind carries (NeoX YAML, ``config.json``);
- :mod:`.conversion`: :class:`Prepared` and :func:`prepare`, the one path every direction takes to a proven plan;
- :mod:`.run`: :func:`convert_checkpoint` streams it into a writer; :func:`finalize_parts`;
- :mod:`.detection`: :func:`detect_checkpoint`.
"""

from mapper.checkpoints.detection import checkpoint_parameters, detect_checkpoint
from mapper.checkpoints.hf_side import recorded_rules
from mapper.checkpoints.options import ConversionOptions
from mapper.checkpoints.conversion import Prepared, prepare
from mapper.checkpoints.run import ConversionResult, convert_checkpoint, finalize_parts
from mapper.record import RECORD_FILE

__all__ = [
    "RECORD_FILE", "ConversionOptions", "ConversionResult", "Prepared", "checkpoint_parameters", "convert_checkpoint", "detect_checkpoint",
    "finalize_parts", "prepare", "recorded_rules",
]
