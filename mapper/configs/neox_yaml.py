"""NeoX YAML: read and merge config files as ``NeoXArgs.from_ymls`` does, and translate to and from
:class:`~mapper.configs.model.NeoXModelConfig` through the field markers of :mod:`mapper.configs.settings`.

Facts from EleutherAI/gpt-neox ``megatron/neox_arguments/arguments.py``: several YAML files are
merged into one dict, ``-`` becomes ``_``, a key given by two files is an error, and unknown keys
are refused when ``NeoXArgs`` is built (so a typo such as ``te-layernorm_mlp`` would have stopped
training; mapper warns about it instead of silently reading the switch as off).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mapper.configs.model import Activation, Norm, PosEmb, NeoXModelConfig, attention_types
from mapper.configs.settings import settings
from mapper.dtypes import precision_of
from mapper.errors import MapperError
from mapper.input_files import read_text
from mapper.safe_yaml import load_yaml


class NeoXYaml(dict):
    """A merged NeoX config (keys in ``_`` spelling) that remembers which file set each key."""

    origins: dict[str, str]

    def __init__(self, *args: Any, origins: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origins = dict(origins or {})


# ---- reading files ------------------------------------------------------------------------------


def load_neox_yaml(paths: Sequence[Path | str] | Path | str) -> NeoXYaml:
    """Read and merge NeoX YAML files the way ``NeoXArgs.from_ymls`` does.

    Top-level keys are normalized to ``_`` spelling. A key present in two files (in any
    spelling) is an error, as in NeoX (whose own check only catches repeated ``_`` spellings).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged = NeoXYaml()
    for path in map(Path, paths):
        loaded = _read_yaml(path)
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise MapperError(f"a NeoX config must be a mapping of keys, not {type(loaded).__name__}", where=path,
                              hint="pass the model YAML (num-layers, hidden-size, ...) with --config")
        for key, value in normalize_keys(loaded, where=str(path)).items():
            if key in merged:
                raise MapperError(
                    f"key {key!r} is set in two config files ({merged.origins[key]} and {path})",
                    where=f"{path}: {key}",
                    hint="NeoX refuses duplicate keys across files; remove one",
                )
            merged[key] = value
            merged.origins[key] = str(path)
    return merged


def _read_yaml(path: Path) -> Any:
    """A config file's YAML: a regular file of bounded size, parsed with bounded nesting and aliases
    (:mod:`mapper.safe_yaml`); a key written twice is an error."""
    text = read_text(path, what="this NeoX config", error=MapperError,
                     hint="check the path given to --config (the YAML the model was trained with)")
    try:
        return load_yaml(text, where=str(path))
    except MapperError as exc:
        raise MapperError(exc.message, where=f"{path}:{(exc.where or '').split(':', 1)[-1]}", hint=exc.hint) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise MapperError(f"not valid YAML: {getattr(exc, 'problem', None) or exc}", where=where,
                          hint="fix the YAML at that line, or pass another file with --config "
                          "(NeoX configs are plain YAML mappings)") from None


def normalize_keys(raw: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """``-`` and ``_`` spell the same NeoX key; two spellings of one key is an error."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise MapperError(f"config key {key!r} is not a string", where=where, hint="quote the key or remove it")
        norm = key.replace("-", "_")
        if norm in out:
            raise MapperError(f"key {key!r} and {spelled[norm]!r} are the same NeoX key", where=f"{where}: {key}",
                              hint="keep one spelling")
        out[norm] = value
        spelled[norm] = key
    return out


@lru_cache(maxsize=1)
def known_neox_keys() -> frozenset[str]:
    """Every key some gpt-neox release's NeoXArgs accepted (``neox_keys.txt``), plus mapper's own."""
    text = Path(__file__).with_name("neox_keys.txt").read_text(encoding="utf-8")
    names = {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
    names |= {marker.key for _, marker in settings(NeoXModelConfig) if marker.mapper_only}
    return frozenset(names | {"vocab_size"})


def unknown_key_warnings(raw: Mapping[str, Any]) -> list[str]:
    """One warning per key no gpt-neox release knows, with the nearest known key."""
    origins = getattr(raw, "origins", {})
    warnings = []
    for key in raw:
        norm = str(key).replace("-", "_")
        if norm in known_neox_keys():
            continue
        close = difflib.get_close_matches(norm, known_neox_keys(), n=1, cutoff=0.75)
        where = f" in {origins[key]}" if key in origins else ""
        warnings.append(
            f"config key {norm!r}{where} is not a NeoX setting"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + "; mapper ignores it, NeoX itself would refuse it"
        )
    return warnings


def pad_vocab_size(orig: int, divisible_by: int, tp: int) -> int:
    """NeoX's ``_vocab_size_with_padding``: round up to a multiple of divisible_by × TP."""
    multiple = divisible_by * tp
    return multiple * math.ceil(orig / multiple)


# ---- NeoX YAML -> model --------------------------------------------------------------------------


def model_from_neox_yaml(
    raw: Mapping[str, Any], *, tp: int | None = None, padded_vocab_size: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NeoXModelConfig:
    """Build the model description from a (merged) NeoX YAML dict.

    ``tp`` overrides ``model-parallel-size`` (the checkpoint's file count is the truth);
    ``overrides`` are settings given on the command line (``--set key=value``). The padded
    vocabulary comes from ``padded_vocab_size`` (the checkpoint's rows), else from
    ``padded-vocab-size`` in the YAML, else from an unpadded ``vocab-size`` padded the NeoX way.
    """
    args = normalize_keys({**raw, **(overrides or {})}, where="config")
    reject_unsupported(args)
    values: dict[str, Any] = {}
    for name, marker in settings(NeoXModelConfig):
        present = [args[k] for k in (marker.key, *marker.also) if args.get(k) is not None]
        if not present:
            continue
        if NeoXModelConfig.model_fields[name].annotation is bool and all(isinstance(v, bool) for v in present):
            values[name] = any(present)  # te_mha or te_fp8_mha, as NeoX reads them
        else:
            values[name] = present[0]

    values.setdefault("num_kv_heads", values.get("num_heads"))
    if tp is not None:
        values["tp"] = tp
    orig_vocab = args.get("orig_vocab_size", args.get("vocab_size"))
    if orig_vocab is not None:
        values["orig_vocab_size"] = orig_vocab
    if padded_vocab_size is not None:
        values["vocab_size"] = padded_vocab_size
    elif "vocab_size" not in values and isinstance(orig_vocab, int):
        values["vocab_size"] = pad_vocab_size(
            orig_vocab, _int_or(values.get("make_vocab_size_divisible_by"), NeoXModelConfig.default("make_vocab_size_divisible_by")),
            _int_or(values.get("tp"), NeoXModelConfig.default("tp")))
    if "vocab_size" not in values:
        raise MapperError(
            "the NeoX config does not say how large the (padded) vocabulary is", where="config: padded-vocab-size",
            hint="pass padded_vocab_size (rows of word_embeddings summed over TP ranks) or add "
            "`padded-vocab-size` / `vocab-size` to the YAML",
        )
    activation = values.get("activation", "gelu")
    if values.get("mlp_type") == "llama":  # legacy LLaMAParallelMLP: act(w1 x) * w3 x, act = silu/swish
        if activation not in ("silu", "swish", "swiglu"):
            raise MapperError(f"legacy mlp-type llama with activation {activation!r} is not supported",
                              where="config: activation", hint="mapper knows the silu llama MLP only")
        values["activation"] = "swiglu"
    elif activation == "swish":
        values["activation"] = "silu"
    if isinstance(values.get("rotary_emb_base"), int) and not isinstance(values["rotary_emb_base"], bool):
        values["rotary_emb_base"] = float(values["rotary_emb_base"])
    values["precision"] = _precision(args)
    return validated(values, where="config")


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def validated(values: Mapping[str, Any], *, where: str, names: Mapping[str, str] | None = None) -> NeoXModelConfig:
    """``NeoXModelConfig(**values)``, its errors worded with the keys the user wrote."""
    try:
        return NeoXModelConfig(**values)
    except ValidationError as exc:
        keys = names or {name: marker.key for name, marker in settings(NeoXModelConfig)}
        details = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            label = keys.get(field, field).replace("_", "-") if where == "config" else keys.get(field, field)
            shown = f" (got {error['input']!r})" if field and not isinstance(error.get("input"), dict) else ""
            details.append(f"{label or 'model'}: {error['msg'].removeprefix('Value error, ')}{shown}")
        raise MapperError(f"invalid model configuration: {'; '.join(details)}", where=where,
                          hint="fix the config (or --config / --tp) so these values are valid and agree") from None


_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    # key: (value that is fine, why anything else is refused)
    "use_qk_layernorm": (False, "QK layernorm is not modelled by mapper"),
    "use_mup": (False, "muP rescales logits and attention; not modelled by mapper"),
    "opt_pos_emb_offset": (0, "the OPT position offset is not modelled by mapper"),
}


def reject_unsupported(args: Mapping[str, Any]) -> None:
    """Refuse, before anything else, settings whose computation mapper does not model."""
    for key, (fine, why) in _UNSUPPORTED.items():
        value = args.get(key)
        if value not in (None, fine):
            raise MapperError(f"{key.replace('_', '-')}: {value!r}: {why}", where=f"config: {key}",
                              hint="mapper cannot verify a conversion of this model")
    for key, allowed, default in (("norm", Norm, "layernorm"), ("pos_emb", PosEmb, "learned")):
        value = args.get(key, default)
        if value not in allowed.__args__:
            raise MapperError(f"{key.replace('_', '-')} {value!r} is not supported", where=f"config: {key}",
                              hint=f"supported: {', '.join(allowed.__args__)}")
    activation = args.get("activation", "gelu")
    if activation not in (*Activation.__args__, "swish"):
        raise MapperError(f"activation {activation!r} is not supported by mapper", where="config: activation",
                          hint=f"supported: {', '.join(Activation.__args__)}")
    experts = args.get("moe_num_experts") or 1
    if not isinstance(experts, int) or experts > 1:
        raise MapperError("mixture-of-experts models are not supported", where="config: moe_num_experts",
                          hint="mapper converts dense GPT-NeoX and Llama-architecture models")
    for kind in attention_types(args.get("attention_config")):
        if kind not in ("global", "flash"):
            raise MapperError(f"attention type {kind!r} is not supported (only global/flash attention)",
                              where="config: attention_config",
                              hint="HF models compute causal attention (dense, or Mistral's sliding window) only")
    if args.get("output_layer_parallelism") not in (None, "column"):
        raise MapperError("output-layer-parallelism must be column", where="config: output_layer_parallelism",
                          hint="mapper merges the output layer as NeoX's default column-parallel layout")


def _precision(args: Mapping[str, Any]) -> str:
    """NeoX ``precision``, else the DeepSpeed ``fp16``/``bf16`` blocks' ``enabled``."""
    value = args.get("precision")
    if value is not None:
        precision = precision_of(str(value))
        if precision is None:
            raise MapperError(f"precision {value!r} is not one of fp16, bfloat16, fp32", where="config: precision",
                              hint="set precision to fp16, bfloat16 or fp32")
        return precision
    for key, name in (("fp16", "fp16"), ("bf16", "bfloat16")):
        block = args.get(key)
        if isinstance(block, Mapping) and block.get("enabled", False):
            return name
    return "fp32"


# ---- model -> NeoX YAML --------------------------------------------------------------------------

_ALWAYS_WRITTEN = {"num_layers", "hidden_size", "num_heads", "vocab_size", "tp", "norm", "pos_emb", "activation"}


def model_to_neox_yaml(model: NeoXModelConfig) -> dict[str, Any]:
    """The model part of a NeoX YAML with hyphenated keys, as NeoX's own configs write them.

    Only values that differ from NeoX's defaults are written (beside the sizes), so the file also
    loads in gpt-neox releases that predate newer keys (``te-mha``, ``use-bias-in-norms``...).
    """
    out: dict[str, Any] = {}
    for name, marker in settings(NeoXModelConfig):
        if not marker.write or name == "precision":
            continue
        value = getattr(model, name)
        if value is None or (name not in _ALWAYS_WRITTEN and value == NeoXModelConfig.model_fields[name].default):
            continue
        if name == "num_kv_heads" and not model.is_gqa:
            continue
        if name == "activation" and model.mlp_type == "llama":
            value = "silu"
        if isinstance(value, float) and value.is_integer() and name == "rotary_emb_base":
            value = int(value)  # NeoX types rotary_emb_base as int and refuses 10000.0
        out[marker.key.replace("_", "-")] = value
    out["precision"] = model.precision
    if model.precision == "fp16":
        out["fp16"] = {"enabled": True}
    elif model.precision == "bfloat16":
        out["bf16"] = {"enabled": True}
    return out
