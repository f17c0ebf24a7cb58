#!/usr/bin/env python
"""Dump GPT-NeoX's own activations for ``mapper verify --reference``.

This file is self-contained on purpose: it needs torch and gpt-neox (with DeepSpeed) only, never
mapper, so copy it into a gpt-neox checkout (``mapper reference-script --out FILE`` writes it) and
run it in the environment the model was trained in. It loads the checkpoint with gpt-neox's own
code -- ``NeoXArgs`` from the checkpoint's configs, ``GPT2ModelPipe`` as gpt-neox builds it for
evaluation, DeepSpeed's ``load_state_dir`` (pipeline layout) or the ``mp_rank`` module dict
(sequential layout) -- runs one token batch, and writes the hidden states at every comparison
point to a safetensors file:

``input_ids`` [batch, seq] (int64); ``embeddings``, ``blocks.{i}`` (each transformer layer's
output), ``final_norm`` ([batch, seq, hidden]) and ``logits`` ([batch, seq, padded vocab]); with the
sequential residual also ``blocks.{i}.after_attention`` (the residual stream between the attention
and the MLP). The file's metadata says which tokens, dtype, device, TP degree, the config's hash,
gpt-neox's commit when known, and gpt-neox's effective model settings.

Usage (from a gpt-neox checkout, or with ``--neox-path``)::

    python neox_reference_dump.py --checkpoint CKPT --out reference.safetensors           # seeded ids
    python neox_reference_dump.py --checkpoint CKPT --out ref.safetensors --text "Hello"  # through the tokenizer
    python neox_reference_dump.py --checkpoint CKPT --out ref.safetensors --ids ids.json  # ids chosen by mapper

``CKPT`` is the save folder (with ``latest``) or a ``global_stepN`` folder; ``--config`` overrides
``global_stepN/configs/*.yml``. The script starts one process per tensor-parallel rank itself
(NCCL on GPUs, gloo on CPU); under a launcher that sets ``RANK``/``WORLD_SIZE`` (``torchrun
--nproc_per_node TP``, ``deepspeed --num_gpus TP``) it joins it instead. On CPU the CUDA-only
kernels are switched off (fused softmax, fused rotary, flash attention: a sliding window is then
applied by the attention mask, as gpt-neox's training does); Transformer Engine needs a GPU. Tensors are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile

import torch

FORMAT = "mapper-neox-reference/1"
SETTINGS = (  # gpt-neox's effective model settings, recorded for mapper's config check
    "num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size", "expansion_factor",
    "mlp_multiple_of", "mlp_type", "padded_vocab_size", "make_vocab_size_divisible_by", "model_parallel_size",
    "norm", "layernorm_epsilon", "rms_norm_epsilon", "use_bias_in_norms", "activation", "bias_gelu_fusion",
    "use_bias_in_attn_linear", "use_bias_in_mlp", "gpt_j_residual", "gpt_j_tied", "pos_emb", "rotary_pct",
    "rotary_emb_base", "no_weight_tying", "seq_length", "max_position_embeddings", "te_mha", "te_fp8_mha",
    "te_layernorm_mlp", "te_columnparallel", "te_rowparallel", "precision", "sliding_window_width",
)
CPU_OVERRIDES = {  # CUDA-only kernels off; see mapper's docs/verification.md
    "use_cpu_initialization": True,
    "scaled_upper_triang_masked_softmax_fusion": False,
    "scaled_masked_softmax_fusion": False,
    "rope_fusion": False,
    "layernorm_fusion": False,
    "rmsnorm_fusion": False,
}
EVAL_OVERRIDES = {
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "checkpoint_activations": False,
    "partition_activations": False,
    "zero_optimization": {"stage": 0},
    "optimizer": None,
    "pipe_parallel_size": 1,
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="NeoX save folder (with `latest`) or a global_stepN folder")
    p.add_argument("--out", required=True, help="the safetensors file to write")
    p.add_argument("--config", nargs="*", default=None, help="NeoX YAML files (default: global_stepN/configs/*.yml)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", help="run this text through the checkpoint's tokenizer")
    source.add_argument("--ids", help="a JSON file of token ids [[...], ...] (e.g. written by mapper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated ids (without --text/--ids)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute precision (default: float32 on CPU, the config's precision on GPU)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--neox-path", default=None, help="the gpt-neox checkout to import `megatron` from (default: cwd)")
    return p.parse_args(argv)


# ---- the checkpoint and its config ----------------------------------------------------------------


def tag_folder(path: str) -> str:
    """``global_stepN`` itself, or the folder ``latest`` names."""
    if glob.glob(os.path.join(path, "*model_states.pt")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(path, f.read().strip())
    steps = sorted(glob.glob(os.path.join(path, "global_step*")))
    if len(steps) == 1:
        return steps[0]
    sys.exit(f"error: {path}: no model files, no `latest` file and not exactly one global_step* folder")


def read_config(files: list[str]) -> tuple[dict, str]:
    """Merged YAML (``-`` spelled ``_``, as NeoXArgs.from_ymls does) and its sha256 (sorted JSON)."""
    import yaml

    merged: dict = {}
    for name in files:
        with open(name) as f:
            loaded = yaml.safe_load(f) or {}
        for key, value in loaded.items():
            key = key.replace("-", "_")
            if key in merged:
                sys.exit(f"error: {name}: key {key!r} is also set in another config file")
            merged[key] = value
    digest = hashlib.sha256(json.dumps(merged, sort_keys=True, default=str).encode()).hexdigest()
    return merged, digest


def neox_commit(neox_path: str) -> str:
    """gpt-neox's git commit when it is a checkout (``unknown`` otherwise)."""
    try:
        out = subprocess.run(["git", "-C", neox_path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_weights_only(path: str) -> dict:
    """``torch.load(weights_only=True)``; old TE FP8 ``_extra_state`` values (io.BytesIO) allowed."""
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([io.BytesIO, argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - said to the person, with the file
        sys.exit(f"error: {path} cannot be read with torch.load(weights_only=True): {error}")


def embedding_rows(step: str) -> int | None:
    """Rows of rank 0's word embeddings (to size the vocabulary when no tokenizer is at hand)."""
    layer0 = os.path.join(step, "layer_00-model_00-model_states.pt")
    if os.path.isfile(layer0):
        state = load_weights_only(layer0)
        return int(state["word_embeddings.weight"].shape[0])
    rank0 = os.path.join(step, "mp_rank_00_model_states.pt")
    if os.path.isfile(rank0):
        module = load_weights_only(rank0).get("module") or {}
        weight = module.get("sequential.0.word_embeddings.weight")
        return None if weight is None else int(weight.shape[0])
    return None


# ---- gpt-neox --------------------------------------------------------------------------------------


def neox_args_for(config: dict, config_files: list[str], world_size: int, device: str):
    from megatron.neox_arguments import NeoXArgs

    known = set(NeoXArgs.__dataclass_fields__)
    ignored = sorted(k for k in config if k not in known)
    values = {k: v for k, v in config.items() if k in known}
    values.update(EVAL_OVERRIDES)
    if not values.get("train_batch_size") and not values.get("train_micro_batch_size_per_gpu"):
        values["train_micro_batch_size_per_gpu"] = 1  # required by NeoXArgs; no training happens here
    values["global_num_gpus"] = world_size
    if device == "cpu":
        values.update(CPU_OVERRIDES)
        values["distributed_backend"] = "gloo"
        values["attention_config"] = [[["global"], int(values["num_layers"])]]
    values = {k: v for k, v in values.items() if k in known}
    contents = {}
    for name in config_files:
        with open(name) as f:
            contents[os.path.basename(name)] = f.read()
    values["config_files"] = contents
    return NeoXArgs.from_dict(values), ignored


def init_distributed(neox_args, rank: int, world_size: int, device: str):
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron import mpu
    from megatron.initialize import setup_deepspeed_random_and_activation_checkpointing

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:  # the one CUDA call left on the fp32 path pre-allocates baddbmm's output (beta=0, never read)
        torch.cuda.current_device = lambda: torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    tp = neox_args.model_parallel_size
    topology = PipeModelDataParallelTopology(num_pp=1, num_mp=tp, num_dp=world_size // tp)
    mpu.initialize_model_parallel(tp, topology=topology)
    setup_deepspeed_random_and_activation_checkpointing(neox_args)
    mpu.model_parallel_cuda_manual_seed(neox_args.seed)
    return topology


def build_and_load(neox_args, topology, step: str, dtype: torch.dtype, device: str):
    """GPT2ModelPipe for evaluation with the checkpoint's weights (strict: every key must fit)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from megatron import mpu
    from megatron.model import GPT2ModelPipe

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            return load_weights_only(path)

    model = GPT2ModelPipe(neox_args, num_tokentypes=0, parallel_output=False, topology=topology, use_cache=False)
    rank = mpu.get_model_parallel_rank()
    if glob.glob(os.path.join(step, "layer_*-model_*-model_states.pt")):
        model.load_state_dir(step, checkpoint_engine=WeightsOnly(), strict=True)
    else:
        model = model.to_sequential()
        state = load_weights_only(os.path.join(step, f"mp_rank_{rank:02d}_model_states.pt"))
        model.load_state_dict(state["module"], strict=True)
    if hasattr(model, "inference_mode"):
        model.inference_mode(use_cache=False)
    return model.to(device=device, dtype=dtype).eval()


def find_points(model, neox_args) -> dict:
    """The modules whose outputs are the comparison points (by class name: gpt-neox's own)."""
    modules = list(model.modules())
    embedding = [m for m in modules if type(m).__name__ == "EmbeddingPipe"]
    layers = sorted((m for m in modules if type(m).__name__ == "ParallelTransformerLayerPipe"),
                    key=lambda m: m.layer_number)
    norms = [m for m in modules if type(m).__name__ == "NormPipe"]
    if len(embedding) != 1 or len(layers) != neox_args.num_layers or len(norms) != 1:
        sys.exit(f"error: expected one EmbeddingPipe, {neox_args.num_layers} ParallelTransformerLayerPipe and one "
                 f"NormPipe; found {len(embedding)}, {len(layers)}, {len(norms)} (a model this script does not know)")
    return {"embedding": embedding[0], "layers": layers, "norm": norms[0]}


def capture(model, neox_args, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass; every point as [batch, seq, ...] on the CPU."""
    from megatron.utils import get_ltor_masks_and_position_ids

    points = find_points(model, neox_args)
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str, seq_first: bool, from_input: bool = False):
        def hook(_module, args, output=None):
            value = args[0] if from_input else output
            value = value[0] if isinstance(value, (tuple, list)) else value
            value = value.transpose(0, 1) if seq_first else value
            seen[name] = value.detach().to("cpu").contiguous()
        return hook

    handles.append(points["embedding"].register_forward_hook(keep("embeddings", False)))
    for i, layer in enumerate(points["layers"]):
        handles.append(layer.register_forward_hook(keep(f"blocks.{i}", True)))
        if not neox_args.gpt_j_residual:  # the residual stream between attention and MLP
            inner = layer.mlp if getattr(neox_args, "te_layernorm_mlp", False) else layer.post_attention_layernorm
            handles.append(inner.register_forward_pre_hook(keep(f"blocks.{i}.after_attention", True, True)))
    handles.append(points["norm"].register_forward_hook(keep("final_norm", False)))
    # the window as training applies it (W + 1 keys, like flash-attn's window_size=(W, -1)): on CPU,
    # where flash attention is off, the global path's mask carries it
    width = getattr(neox_args, "sliding_window_width", None)
    window = {"sliding_window_width": width} if width is not None else {}
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(ids, 0, **window)
    with torch.no_grad():
        logits = model((ids, position_ids, attention_mask))
    for handle in handles:
        handle.remove()
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits  # pre-#1212: (logits, moe_losses)
    seen["logits"] = logits.detach().to("cpu").contiguous()
    return seen


# ---- tokens and output -----------------------------------------------------------------------------


def token_ids(args: argparse.Namespace, tokenizer, vocab: int) -> tuple[torch.Tensor, str]:
    if args.ids:
        with open(args.ids) as f:
            ids = torch.tensor(json.load(f), dtype=torch.long)
        if ids.dim() != 2 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            sys.exit(f"error: {args.ids}: expected [[id, ...], ...] with ids in [0, {vocab})")
        return ids, f"from {os.path.basename(args.ids)}"
    if args.text is not None:
        if tokenizer is None:
            sys.exit("error: --text needs the checkpoint's tokenizer (tokenizer-type and vocab-file in the config)")
        return torch.tensor([tokenizer.tokenize(args.text)], dtype=torch.long), "text"
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator), f"seed {args.seed}"


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte header size, JSON header, raw little-endian data), written here
    so that the script needs no package beyond torch."""
    header: dict = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name, tensor in tensors.items():
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=folder, delete=False, suffix=".partial") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for blob in blobs:
            f.write(blob)
    os.replace(f.name, path)


# ---- one process per rank --------------------------------------------------------------------------


def run(rank: int, world_size: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=os.environ.get("LOCAL_RANK", str(rank)))
    neox_path = os.path.abspath(args.neox_path or os.getcwd())
    sys.path.insert(0, neox_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    step = tag_folder(args.checkpoint)
    files = args.config or sorted(glob.glob(os.path.join(step, "configs", "*.yml"))
                                  + glob.glob(os.path.join(step, "configs", "*.yaml")))
    if not files:
        sys.exit(f"error: no config files in {step}/configs; pass --config")
    config, digest = read_config(files)
    neox_args, ignored = neox_args_for(config, files, world_size, device)
    tokenizer = None
    try:
        neox_args.build_tokenizer()
        tokenizer = neox_args.tokenizer
        vocab = tokenizer.vocab_size
    except Exception as error:  # noqa: BLE001 - without a tokenizer, seeded or given ids still work
        rows = embedding_rows(step)
        if rows is None or args.text is not None:
            sys.exit(f"error: cannot build the checkpoint's tokenizer: {error}")
        neox_args.padded_vocab_size = rows * neox_args.model_parallel_size
        vocab = neox_args.padded_vocab_size
    dtype = DTYPES[args.dtype] if args.dtype else (
        DTYPES.get(str(neox_args.precision), torch.float32) if device == "cuda" else torch.float32)
    topology = init_distributed(neox_args, rank, world_size, device)
    model = build_and_load(neox_args, topology, step, dtype, device)
    ids, tokens = token_ids(args, tokenizer, vocab)
    points = capture(model, neox_args, ids.to(device))
    metadata = {
        "format": FORMAT,
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "tp": str(neox_args.model_parallel_size),
        "world_size": str(world_size),
        "layout": "pipeline" if glob.glob(os.path.join(step, "layer_*-model_*-model_states.pt")) else "sequential",
        "checkpoint": os.path.abspath(step),
        "config_files": json.dumps([os.path.basename(f) for f in files]),
        "config_sha256": digest,
        "ignored_config_keys": json.dumps(ignored),
        "gpt_neox_commit": neox_commit(neox_path),
        "gpt_neox_path": neox_path,
        "torch_version": torch.__version__,
        "neox_settings": json.dumps({**{key: getattr(neox_args, key, None) for key in SETTINGS},
                                     "attention_config": config.get("attention_config")}, default=str),  # as trained
    }
    try:
        if rank == 0:
            write_safetensors(args.out, {"input_ids": ids.cpu(), **points}, metadata)
            print(f"wrote {args.out}: {len(points)} points on {tuple(ids.shape)} tokens ({tokens}), "
                  f"{metadata['dtype']} on {device}, TP {neox_args.model_parallel_size}")
            if ignored:
                print(f"note: config keys this gpt-neox does not know were ignored: {', '.join(ignored)}")
    finally:  # every rank leaves together: a rank exiting alone can abort the others' gloo threads
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _spawned(rank: int, world_size: int, args: argparse.Namespace) -> None:
    run(rank, world_size, args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun / deepspeed
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    config, _ = read_config(args.config or sorted(glob.glob(os.path.join(tag_folder(args.checkpoint), "configs", "*.y*ml"))))
    tp = int(config.get("model_parallel_size", 1) or 1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if tp == 1:
        run(0, 1, args)
    else:
        torch.multiprocessing.spawn(_spawned, args=(tp, args), nprocs=tp, join=True)


if __name__ == "__main__":
    main()
