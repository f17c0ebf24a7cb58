#!/usr/bin/env python
"""Benchmark: NeoX (Transformer Engine) -> HF conversion against ``cp -r``: wall time and peak RSS.

    python benchmarks/convert_bench.py [--size-gb 2] [--layers N] [--tp 2] [--workdir DIR]
                                       [--repeats 3] [--keep] [--json out.json]

1. Synthesises a NeoX checkpoint of variant ``te-full`` (te_mha + te_layernorm_mlp): bf16 weights,
   ``--tp`` ranks, pipeline layout (``layer_XX-model_YY-model_states.pt``, ``mp_rank`` files,
   ``latest``, ``configs/model.yml``), written one layer at a time (the model is never whole in
   memory), deterministic from ``--seed``. The hidden size is chosen so that ``--layers`` blocks
   plus untied 50k-vocabulary embeddings (Pythia-like) make about ``--size-gb`` GB.
2. Measures, alternating, ``--repeats`` times each: ``cp -r`` of the checkpoint folder (alone, and
   followed by an fsync of every copied file, since mapper fsyncs what it writes), and mapper's
   ``convert_checkpoint`` to an HF folder, run in a fresh child process: its peak RSS is the
   kernel's high-water mark ``VmHWM`` (read by the child from ``/proc/self/status`` when done),
   cross-checked with ``ru_maxrss`` of ``os.wait4`` in the parent (which never imports torch, so
   a forked child does not inherit a big RSS). The conversion is measured twice over: with the
   expected-key cache of :mod:`mapper.hf_models` (filled by the warm-up, as by any earlier
   conversion of the same model config) and without it (``MAPPER_CACHE_DIR=""``: transformers is
   imported during the run, as on the first conversion of a config). Before every measured run the page cache is dropped
   (``sync; echo 3 > /proc/sys/vm/drop_caches``) when permitted, else the source is read once so
   every run starts warm (the output says which).
3. Does it again with twice the layers (same hidden size, so the same per-layer size).

Reported: medians; conversion / (cp + fsync) (target <= 1.3), split into ``prepare`` (open, detect
the rule set, compile) and ``stream`` (read, convert, write, fsync); peak RSS against the largest
layer group (all TP ranks of one pipeline layer) and peak RSS minus the RSS of a process that only
imported torch + mapper (target <= 2 x largest group + 400 MB), flat from N to 2N layers.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 10**6
GB = 10**9
HEAD_DIM = 128
ORIG_VOCAB = 50277  # the GPT-NeoX tokenizer (Pythia)
VOCAB_DIVISIBLE_BY = 128
RULES = "neox-te-to-hf-gpt-neox"
HERE = Path(__file__).resolve()


# ---- /proc --------------------------------------------------------------------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile... of ``/proc/<pid>/status``, in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                values[name] = int(parts[0]) * 1024
    return values


def cpu_pressure() -> float | None:
    """``some avg10`` of /proc/pressure/cpu: % of the last 10 s some task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            first = f.readline().split()
        return float(dict(item.split("=") for item in first[1:])["avg10"])
    except (OSError, KeyError, ValueError):
        return None


def load_average() -> float:
    return os.getloadavg()[0]


# ---- child processes (each a fresh interpreter) -------------------------------------------------
def child_main(argv: list[str]) -> None:
    """``--_child KIND RESULT_JSON ARGS...``: baseline | convert | prepare | synth."""
    start = time.perf_counter()
    kind, result_path, args = argv[0], Path(argv[1]), argv[2:]
    if kind == "synth":
        result = synthesize(Path(args[0]), int(args[1]), int(args[2]), int(args[3]), int(args[4]))
        result_path.write_text(json.dumps(result))
        return
    import torch

    import mapper
    from mapper.checkpoints import convert_checkpoint, prepare

    imported = time.perf_counter()
    result: dict[str, Any] = {
        "import_s": imported - start,
        "rss_after_import": proc_status()["VmRSS"],
        "torch": torch.__version__,
        "mapper": mapper.__version__,
    }
    if kind == "prepare":  # the rule set named: no detection
        t0 = time.perf_counter()
        prepare(args[0], rules=args[1], background_checks=True)  # as convert_checkpoint does
        result["prepare_s"] = time.perf_counter() - t0
    elif kind == "convert":
        src, dst, max_shard = args[0], args[1], int(args[2])
        started: dict[str, Any] = {}

        def on_start(nbytes: int) -> None:  # called once the plan is ready, before any tensor is read
            started.update(t1=time.perf_counter(), status=proc_status())

        t0 = time.perf_counter()
        converted = convert_checkpoint(src, dst, max_shard_size=max_shard, on_start=on_start)
        t2 = time.perf_counter()
        t1, prepared_status = started["t1"], started["status"]
        report = converted.report
        result.update(
            rules=converted.prepared.rules.name,
            prepare_s=t1 - t0,
            stream_s=t2 - t1,
            convert_s=t2 - t0,
            rss_after_prepare=prepared_status["VmRSS"],
            hwm_after_prepare=prepared_status["VmHWM"],
            groups=report.groups,
            tensors=report.tensors,
            bytes_written=report.bytes_written,
            peak_live_bytes=report.peak_live_bytes,
            largest_group_bytes=report.largest_group_bytes,
        )
    status = proc_status()
    result.update(vmhwm=status["VmHWM"], rss_end=status["VmRSS"])
    result_path.write_text(json.dumps(result))


def run_child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child; its JSON plus ``wall_s`` (whole process) and ``ru_maxrss`` (bytes, from wait4)."""
    fd, name = tempfile.mkstemp(suffix=".json", prefix="mapper-bench-")
    os.close(fd)
    result_path = Path(name)
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(HERE), "--_child", args[0], str(result_path), *args[1:]],
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
        if proc.returncode != 0:
            raise SystemExit(f"child {args[0]} failed with exit code {proc.returncode}")
        result = json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)
    result["wall_s"] = wall
    result["ru_maxrss"] = usage.ru_maxrss * 1024  # Linux: kilobytes
    return result


# ---- the synthetic checkpoint -------------------------------------------------------------------
def padded_vocab(tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return multiple * math.ceil(ORIG_VOCAB / multiple)


def estimated_bytes(layers: int, hidden: int, tp: int) -> int:
    """bf16 bytes of the te-full checkpoint: ~12 h^2 per block, two untied vocab x h matrices."""
    return 2 * (layers * (12 * hidden * hidden + 13 * hidden) + 2 * padded_vocab(tp) * hidden)


def choose_hidden(size_bytes: float, layers: int, tp: int) -> int:
    """The multiple of HEAD_DIM x tp whose checkpoint size is closest to ``size_bytes``."""
    step = HEAD_DIM * tp
    candidates = range(step, 64 * 1024 + 1, step)
    return min(candidates, key=lambda h: abs(estimated_bytes(layers, h, tp) - size_bytes))


def bench_config(layers: int, hidden: int, tp: int) -> Any:
    from mapper.testing import tiny_config

    return tiny_config(
        "te-full", tp=tp, num_layers=layers, hidden_size=hidden, num_heads=hidden // HEAD_DIM,
        num_kv_heads=hidden // HEAD_DIM, orig_vocab_size=ORIG_VOCAB,
        make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY, seq_length=2048, max_position_embeddings=2048,
        no_weight_tying=True, precision="bfloat16",
    )


def layer_seed(seed: int, idx: int, rank: int, key: str) -> int:
    import zlib

    return (seed * 1_000_003 + idx * 7919 + rank * 104_729 + zlib.crc32(key.encode())) % (2**62)


def synthesize(root: Path, layers: int, hidden: int, tp: int, seed: int) -> dict[str, Any]:
    """Write the checkpoint under ``root`` layer by layer; returns the bytes of each layer.

    Template: the tensors mapper.testing.synthesize_neox makes for a 1-block model of the same
    width. Embeddings, final norm and output layer are taken as they are; every block reuses the
    template's 1-D tensors (norms, biases, empty ``_extra_state``, the stale ones/zeros norm of
    pre-fix TE checkpoints) and draws each matrix afresh, seeded by (seed, layer, rank, key).
    Each layer is saved with mapper.testing.write_neox_checkpoint (real file names and formats).
    """
    import torch

    from mapper.formats.naming import neox_key, parse_neox_key
    from mapper.testing import synthesize_neox, write_neox_checkpoint

    config = bench_config(layers, hidden, tp)
    one = bench_config(1, hidden, tp)
    template: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in synthesize_neox(one, naming="new", seed=seed, dtype=torch.bfloat16).items():
        template.setdefault(parse_neox_key(key).idx, {})[key] = tensor
    moved = {0: 0, one.final_norm_layer_index: config.final_norm_layer_index,
             one.final_linear_layer_index: config.final_linear_layer_index}
    sizes: dict[int, int] = {}

    def save(idx: int, tensors: dict[str, torch.Tensor]) -> None:
        write_neox_checkpoint(tensors, config, root)
        sizes[idx] = sum(t.nbytes for t in tensors.values())

    for old, new in moved.items():
        save(new, {neox_key(new, parse_neox_key(k).key, parse_neox_key(k).rank): t for k, t in template[old].items()})
    block = template[one.block_layer_index(0)]
    for b in range(layers):
        idx = config.block_layer_index(b)
        tensors = {}
        for key, tensor in block.items():
            name = parse_neox_key(key)
            if tensor.dim() == 2:
                g = torch.Generator().manual_seed(layer_seed(seed, idx, name.rank, name.key))
                fresh = torch.randn(tensor.shape, generator=g).mul_(1 / math.sqrt(tensor.shape[1]))
                tensor = fresh.to(torch.bfloat16)
                del fresh
            tensors[neox_key(idx, name.key, name.rank)] = tensor
        save(idx, tensors)
        del tensors
    return {"layer_bytes": {str(k): v for k, v in sorted(sizes.items())}}


# ---- page cache, copying, sizes -----------------------------------------------------------------
def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False when that is not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def read_tree(folder: Path) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def prepare_cache(src: Path, can_drop: bool) -> None:
    """The same page-cache state before every measured run."""
    if not (can_drop and drop_caches()):
        os.sync()
        read_tree(src)


# ---- one scale ----------------------------------------------------------------------------------
def measure_scale(
    work: Path, *, layers: int, hidden: int, tp: int, seed: int, repeats: int, max_shard: int | None,
    can_drop: bool, warmup: bool, log: Any, child_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    src = work / f"neox-{layers}L"
    remove(src)
    log(f"[{layers} layers] synthesising te-full, hidden {hidden}, TP={tp}, bf16 -> {src}")
    t0 = time.perf_counter()
    made = run_child(["synth", str(src), str(layers), str(hidden), str(tp), str(seed)])
    os.sync()
    synth_s = time.perf_counter() - t0
    layer_bytes = {int(k): v for k, v in made["layer_bytes"].items()}
    largest_layer = max(layer_bytes.values())
    block_bytes = layer_bytes[2]
    src_bytes = tree_bytes(src)
    shard = max_shard or largest_layer
    log(f"[{layers} layers] {src_bytes / GB:.2f} GB on disk in {synth_s:.0f} s; largest layer group "
        f"{largest_layer / MB:.0f} MB, one block {block_bytes / MB:.0f} MB; max_shard_size {shard / MB:.0f} MB")

    copy_dst, hf_dst = work / f"copy-{layers}L", work / f"hf-{layers}L"
    # The expected-key cache (mapper.hf_models): the benchmark's own, empty at first; the warm-up
    # fills it, as the first conversion of a model config does. "uncached" runs turn it off.
    key_cache = work / f"key-cache-{layers}L"
    remove(key_cache)
    cached_env = {"MAPPER_CACHE_DIR": str(key_cache), **(child_env or {})}
    uncached_env = {**cached_env, "MAPPER_CACHE_DIR": ""}

    def run_cp() -> dict[str, Any]:
        prepare_cache(src, can_drop)
        before = (load_average(), cpu_pressure())
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(copy_dst)], check=True)
        t1 = time.perf_counter()
        fsync_tree(copy_dst)
        t2 = time.perf_counter()
        return {"cp_s": t1 - t0, "cp_fsync_s": t2 - t0, "load_before": before[0], "cpu_pressure_before": before[1],
                "cpu_pressure_after": cpu_pressure()}

    def run_convert(env: dict[str, str] = cached_env) -> dict[str, Any]:
        prepare_cache(src, can_drop)
        before = (load_average(), cpu_pressure())
        result = run_child(["convert", str(src), str(hf_dst), str(shard)], env=env)
        result.update(load_before=before[0], cpu_pressure_before=before[1], cpu_pressure_after=cpu_pressure(),
                      out_bytes=tree_bytes(hf_dst))
        return result

    if warmup:  # page-cache and guest-memory first touches, imports' disk reads: not measured
        log(f"[{layers} layers] warm-up (not measured): cp -r, convert")
        for what in (run_cp, run_convert):
            remove(copy_dst)
            remove(hf_dst)
            what()
    cp_runs: list[dict[str, Any]] = []
    conv_runs: list[dict[str, Any]] = []
    uncached_runs: list[dict[str, Any]] = []
    for rep in range(repeats):
        order = ("cp", "convert", "uncached")
        for what in (order if rep % 2 == 0 else order[::-1]):
            remove(copy_dst)
            remove(hf_dst)
            if what == "cp":
                run = run_cp()
                cp_runs.append(run)
                log(f"[{layers} layers] run {rep + 1}/{repeats} cp -r: {run['cp_s']:.2f} s, with fsync "
                    f"{run['cp_fsync_s']:.2f} s  (cpu pressure {run['cpu_pressure_before']}%)")
            else:
                run = run_convert(cached_env if what == "convert" else uncached_env)
                (conv_runs if what == "convert" else uncached_runs).append(run)
                log(f"[{layers} layers] run {rep + 1}/{repeats} convert{' (no key cache)' if what == 'uncached' else ''}: "
                    f"{run['convert_s']:.2f} s = prepare "
                    f"{run['prepare_s']:.2f} + stream {run['stream_s']:.2f} (process {run['wall_s']:.2f} s), "
                    f"peak RSS {run['vmhwm'] / MB:.0f} MB, {run['groups']} shards  "
                    f"(cpu pressure {run['cpu_pressure_before']}%)")
    out_bytes = conv_runs[-1]["out_bytes"]
    remove(copy_dst)
    remove(hf_dst)
    prepare_cache(src, can_drop)
    named = [run_child(["prepare", str(src), RULES], env=cached_env) for _ in range(max(1, min(repeats, 3)))]
    log(f"[{layers} layers] prepare with --rules {RULES} (no detection): "
        f"{statistics.median(r['prepare_s'] for r in named):.2f} s")

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    return {
        "layers": layers,
        "hidden_size": hidden,
        "tp": tp,
        "src": str(src),
        "src_bytes": src_bytes,
        "out_bytes": out_bytes,
        "synth_s": synth_s,
        "layer_bytes": layer_bytes,
        "largest_layer_group_bytes": largest_layer,
        "block_layer_bytes": block_bytes,
        "max_shard_size": shard,
        "rules": conv_runs[-1]["rules"],
        "cp_s": med(cp_runs, "cp_s"),
        "cp_fsync_s": med(cp_runs, "cp_fsync_s"),
        "convert_s": med(conv_runs, "convert_s"),
        "prepare_s": med(conv_runs, "prepare_s"),
        "stream_s": med(conv_runs, "stream_s"),
        "convert_uncached_s": med(uncached_runs, "convert_s"),
        "stream_uncached_s": med(uncached_runs, "stream_s"),
        "peak_rss_uncached": int(med(uncached_runs, "vmhwm")),
        "prepare_named_rules_s": med(named, "prepare_s"),
        "convert_process_s": med(conv_runs, "wall_s"),
        "peak_rss": int(med(conv_runs, "vmhwm")),
        "peak_rss_max": max(r["vmhwm"] for r in conv_runs),
        "peak_rss_wait4": int(med(conv_runs, "ru_maxrss")),
        "rss_after_prepare": int(med(conv_runs, "rss_after_prepare")),
        "peak_live_bytes": int(med(conv_runs, "peak_live_bytes")),
        "largest_shard_bytes": int(med(conv_runs, "largest_group_bytes")),
        "shards": conv_runs[-1]["groups"],
        "max_cpu_pressure": max((r["cpu_pressure_before"] or 0) for r in cp_runs + conv_runs),
        "cp_runs": cp_runs,
        "convert_runs": conv_runs,
        "convert_uncached_runs": uncached_runs,
        "prepare_named_runs": named,
    }


# ---- report -------------------------------------------------------------------------------------
def machine(work: Path) -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    try:
        df = subprocess.run(["df", "-T", str(work)], capture_output=True, text=True, check=True).stdout
        fields = df.splitlines()[1].split()
        fs = f"{fields[1]} on {fields[0]} (mounted at {fields[-1]})"
    except (subprocess.CalledProcessError, IndexError, FileNotFoundError):
        fs = "?"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram, "kernel": platform.release(),
        "python": platform.python_version(), "filesystem": fs, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def summarise(scale: dict[str, Any], baseline_rss: int) -> dict[str, Any]:
    group = scale["largest_layer_group_bytes"]
    above = scale["peak_rss"] - baseline_rss
    budget = 2 * group + 400 * MB
    return {
        "ratio_vs_cp_fsync": scale["convert_s"] / scale["cp_fsync_s"],
        "ratio_vs_cp": scale["convert_s"] / scale["cp_s"],
        "uncached_ratio_vs_cp_fsync": scale["convert_uncached_s"] / scale["cp_fsync_s"],
        "stream_ratio_vs_cp_fsync": scale["stream_s"] / scale["cp_fsync_s"],
        "named_rules_ratio_vs_cp_fsync": (scale["prepare_named_rules_s"] + scale["stream_s"]) / scale["cp_fsync_s"],
        "peak_over_baseline": above,
        "peak_rss_per_group": scale["peak_rss"] / group,
        "peak_over_baseline_per_group": above / group,
        "memory_budget": budget,
        "memory_ok": above <= budget,
        "time_ok": scale["convert_s"] / scale["cp_fsync_s"] <= 1.3,
    }


def table(results: dict[str, Any]) -> str:
    scales = results["scales"]
    rows: list[tuple[str, ...]] = [("", *(f"{s['layers']} layers" for s in scales))]

    def row(label: str, fmt: Any) -> None:
        rows.append((label, *(fmt(s, s["summary"]) for s in scales)))

    row("hidden size / TP", lambda s, m: f"{s['hidden_size']} / {s['tp']}")
    row("checkpoint on disk", lambda s, m: f"{s['src_bytes'] / GB:.2f} GB")
    row("HF output on disk", lambda s, m: f"{s['out_bytes'] / GB:.2f} GB, {s['shards']} shards")
    row("largest layer group (all ranks)", lambda s, m: f"{s['largest_layer_group_bytes'] / MB:.0f} MB")
    row("one block (all ranks)", lambda s, m: f"{s['block_layer_bytes'] / MB:.0f} MB")
    row("max_shard_size / largest shard", lambda s, m: f"{s['max_shard_size'] / MB:.0f} / {s['largest_shard_bytes'] / MB:.0f} MB")
    row("cp -r", lambda s, m: f"{s['cp_s']:.2f} s")
    row("cp -r + fsync", lambda s, m: f"{s['cp_fsync_s']:.2f} s")
    row("convert_checkpoint", lambda s, m: f"{s['convert_s']:.2f} s")
    row("  prepare (open, detect, compile)", lambda s, m: f"{s['prepare_s']:.2f} s")
    row("  stream (read, convert, write)", lambda s, m: f"{s['stream_s']:.2f} s")
    row("  whole child process", lambda s, m: f"{s['convert_process_s']:.2f} s")
    row("convert, no key cache (first of a config)", lambda s, m: f"{s['convert_uncached_s']:.2f} s")
    row("prepare with --rules (no detect)", lambda s, m: f"{s['prepare_named_rules_s']:.2f} s")
    row("convert / (cp+fsync)   [<= 1.3]", lambda s, m: f"{m['ratio_vs_cp_fsync']:.2f} "
        f"({'ok' if m['time_ok'] else 'MISSED'})")
    row("  no key cache / (cp+fsync)", lambda s, m: f"{m['uncached_ratio_vs_cp_fsync']:.2f}")
    row("  stream only / (cp+fsync)", lambda s, m: f"{m['stream_ratio_vs_cp_fsync']:.2f}")
    row("  with --rules / (cp+fsync)", lambda s, m: f"{m['named_rules_ratio_vs_cp_fsync']:.2f}")
    row("convert / cp (no fsync)", lambda s, m: f"{m['ratio_vs_cp']:.2f}")
    row("peak RSS (VmHWM)", lambda s, m: f"{s['peak_rss'] / MB:.0f} MB")
    row("  ru_maxrss (wait4)", lambda s, m: f"{s['peak_rss_wait4'] / MB:.0f} MB")
    row("  highest of the runs", lambda s, m: f"{s['peak_rss_max'] / MB:.0f} MB")
    row("  with no key cache", lambda s, m: f"{s['peak_rss_uncached'] / MB:.0f} MB")
    row("  RSS after prepare", lambda s, m: f"{s['rss_after_prepare'] / MB:.0f} MB")
    row("peak RSS / largest group", lambda s, m: f"{m['peak_rss_per_group']:.2f}")
    row("peak - baseline", lambda s, m: f"{m['peak_over_baseline'] / MB:.0f} MB")
    row("  budget 2 x group + 400 MB", lambda s, m: f"{m['memory_budget'] / MB:.0f} MB "
        f"({'ok' if m['memory_ok'] else 'MISSED'})")
    row("(peak - baseline) / group", lambda s, m: f"{m['peak_over_baseline_per_group']:.2f}")
    row("engine peak_live_bytes", lambda s, m: f"{s['peak_live_bytes'] / MB:.0f} MB")
    row("max CPU pressure before a run", lambda s, m: f"{s['max_cpu_pressure']:.0f}%")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"medians of {results['repeats']} runs; baseline RSS (python + import torch, mapper): "
        f"{results['baseline_rss'] / MB:.0f} MB",
        f"page cache: {results['cache']}",
        *([f"conversion processes ran with {' '.join(f'{k}={v}' for k, v in results['child_env'].items())}"]
          if results.get("child_env") else []),
        "",
    ]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if len(scales) == 2:
        a, b = scales
        lines.append("")
        lines.append(f"peak RSS from {a['layers']} to {b['layers']} layers: {(b['peak_rss'] - a['peak_rss']) / MB:+.0f} MB "
                     f"({b['peak_rss'] / a['peak_rss']:.2f}x) while the checkpoint grew {b['src_bytes'] / a['src_bytes']:.2f}x")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB of bf16 weights (default 2)")
    parser.add_argument("--layers", type=int, default=16, help="transformer blocks (default 16)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: from --size-gb and --layers)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each kind, alternating (default 3)")
    parser.add_argument("--max-shard-size", type=int, default=None,
                        help="HF shard size in bytes (default: the largest layer group, so that a shard "
                        "holds about one layer)")
    parser.add_argument("--child-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the conversion processes only, e.g. "
                        "OMP_NUM_THREADS=1 (repeatable)")
    parser.add_argument("--no-double", action="store_true", help="skip the run at twice the layers")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()

    child_env = dict(item.split("=", 1) for item in args.child_env)
    hidden = args.hidden or choose_hidden(args.size_gb * GB, args.layers, args.tp)
    if hidden % (HEAD_DIM * args.tp):
        parser.error(f"--hidden must be a multiple of {HEAD_DIM * args.tp} (head dim {HEAD_DIM} x TP)")
    scales_layers = [args.layers] if args.no_double else [args.layers, 2 * args.layers]
    created = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="mapper-bench-")) if created else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # at most one scale on disk at a time: source, copy, HF output (+10%)
    need = 3.3 * max(estimated_bytes(n, hidden, args.tp) for n in scales_layers)
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"{work} has {shutil.disk_usage(work).free / GB:.1f} GB free; about {need / GB:.1f} GB needed")

    def log(message: str) -> None:
        print(message, flush=True)

    can_drop = drop_caches()
    cache = ("dropped before every measured run (sync; echo 3 > /proc/sys/vm/drop_caches)" if can_drop
             else "dropping caches is not permitted here: the source was read once before every measured "
             "run instead, so every run started with it in the page cache (warm)")
    log(f"work dir {work}\npage cache: {cache}")
    baselines = [run_child(["baseline"]) for _ in range(3)]
    baseline_rss = int(statistics.median(b["vmhwm"] for b in baselines))
    log(f"baseline RSS (python + import torch, mapper): {baseline_rss / MB:.0f} MB")

    results: dict[str, Any] = {
        "machine": {**machine(work), "torch": baselines[0]["torch"], "mapper": baselines[0]["mapper"]},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "repeats": args.repeats,
        "child_env": child_env,
        "cache": cache,
        "cache_dropped": can_drop,
        "baseline_rss": baseline_rss,
        "baseline_runs": baselines,
        "scales": [],
    }
    try:
        for layers in scales_layers:
            scale = measure_scale(work, layers=layers, hidden=hidden, tp=args.tp, seed=args.seed,
                                  repeats=args.repeats, max_shard=args.max_shard_size, can_drop=can_drop,
                                  warmup=not args.no_warmup, log=log, child_env=child_env)
            scale["summary"] = summarise(scale, baseline_rss)
            results["scales"].append(scale)
            if not args.keep:
                remove(Path(scale["src"]))
    finally:
        for layers in scales_layers:
            for name in (f"copy-{layers}L", f"hf-{layers}L") + (() if args.keep else (f"neox-{layers}L",)):
                remove(work / name)
        if created and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
