"""Model configuration: NeoX YAML <-> one normalized model description <-> HF ``config.json``.

- :mod:`.model`: :class:`NeoXModelConfig`, what a checkpoint computes; each field names its NeoX key
  and HF field (:mod:`.settings`), so it is the one table both directions read;
- :mod:`.neox_yaml`: reading and merging NeoX YAML files, and NeoX YAML <-> model;
- :mod:`.hf`: one :class:`HFTarget` per HF architecture; model <-> ``config.json``, what a target
  cannot represent and what it only approximates;
- :mod:`.switches`: what a checkpoint's keys say (TE switches, naming, gpt-neox code history).
"""

from mapper.configs.hf import TARGETS, Approximation, HFTarget, approximations, target
from mapper.configs.model import (
    GATED_ACTIVATIONS,
    TE_LNMLP_EPS,
    Activation,
    MLPWidths,
    NeoXModelConfig,
    Norm,
    PosEmb,
    Precision,
    RowParallelMultipliers,
)
from mapper.configs.neox_yaml import (
    NeoXYaml,
    load_neox_yaml,
    model_from_neox_yaml,
    normalize_keys,
    pad_vocab_size,
    unknown_key_warnings,
)

__all__ = [
    "GATED_ACTIVATIONS", "TARGETS", "TE_LNMLP_EPS", "Activation", "Approximation", "HFTarget", "MLPWidths",
    "NeoXModelConfig", "NeoXYaml", "Norm", "PosEmb", "Precision", "RowParallelMultipliers", "approximations",
    "load_neox_yaml", "model_from_neox_yaml", "normalize_keys", "pad_vocab_size", "target", "unknown_key_warnings",
]
