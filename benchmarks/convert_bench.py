#!/usr/bin/env python
"""Benchmark: mapper's conversions against ``cp -r`` + fsync, for a set of variants, both directions.

    python benchmarks/convert_bench.py [--layers 8] [--hidden 2048] [--repeats 3] [--cases ...]
                                       [--workdir DIR] [--keep] [--json out.json] [--no-verify]

Cases (each at ``--layers`` and at twice as many, same width):

- ``te-full-parallel``: te_mha + te_layernorm_mlp with gpt-j-residual (NeoX's usual setting, the
  #1353 setup): TE's row-parallel outputs are scaled by TP (``affine``), row-parallel biases
  summed; TP=2, NeoX -> HF.
- ``llama-te``: Llama architecture on TE (per-group GQA QKV taken apart shard by shard, gated
  fc1 split into gate/up, RMSNorm); TP=2, NeoX -> HF.
- ``neox-legacy``: legacy names (``dense_h_to_4h``), gpt-j-residual; TP=4, NeoX -> HF.
- ``hf-to-neox``: the HF folder of ``te-full-parallel`` (written by mapper, unmeasured) back to
  NeoX at TP=2: the inverse rules (splits, the scale divided back, biases shared out).
- ``reshard``: ``te-full-parallel`` re-sharded NeoX -> NeoX from TP=2 to TP=4 (the rule set, then
  its inverse at the new degree: merge, scale, split, in one streamed plan).
- ``masters``: the fp32 master weights of a bf16 run of ``te-full`` at TP=2 (BF16_Optimizer
  shards of 2 data-parallel ranks, with Adam moments) exported to HF (``--weights master``). Its
  ``cp`` baseline copies the bytes the conversion writes (an earlier, unmeasured output): the
  optimizer shards also hold the moments, which the conversion never reads.

For each case: the source is synthesised in a child process, one layer file at a time (bf16,
Pythia-like widths, untied vocabulary; every block's matrices drawn afresh from a seed), then
``cp -r`` of the source folder followed by an fsync of every copied file (mapper fsyncs what it
writes before publishing) and ``convert_checkpoint`` in a fresh child process are run
alternately, ``--repeats`` times each after an unmeasured warm-up of each, with the page cache
dropped before every run (``sync; echo 3 > /proc/sys/vm/drop_caches``; where that is not
permitted the source is read once instead, so every run starts warm; the output says which).
The conversion's peak RSS is the kernel's ``VmHWM`` of the child (cross-checked with
``ru_maxrss`` from ``wait4`` in the parent, which never imports torch). ``mapper verify NEOX HF``
of ``te-full-parallel`` is timed once per depth as a whole process (``--no-verify`` skips it).

Targets (issue #11): conversion time <= 1.3 x (cp -r + fsync) of the same source; peak RSS <=
2 x the largest layer group (one pipeline layer, all TP ranks) + 400 MB, and flat when the layers
double. Reported: medians. See benchmarks/README.md and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 10**6
GB = 10**9
HEAD_DIM = 128
VOCAB_DIVISIBLE_BY = 128
HERE = Path(__file__).resolve()
TIME_TARGET = 1.3
RSS_SLACK = 400 * MB


@dataclass(frozen=True)
class Case:
    """One measured conversion: a synthetic NeoX variant and a direction."""

    name: str
    variant: str  # mapper.testing synthetic variant of the NeoX side
    tp: int
    direction: str  # "neox-to-hf", "hf-to-neox", "neox-to-neox" or "masters" (ZeRO fp32 masters -> HF)
    description: str


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("te-full-parallel", "te-full-parallel", 2, "neox-to-hf",
             "te_mha + te_layernorm_mlp, gpt-j-residual (row-parallel outputs scaled by TP), TP=2"),
        Case("llama-te", "llama-te", 2, "neox-to-hf",
             "Llama on TE: GQA (heads/4 kv heads) per-group QKV, gated fc1, RMSNorm, TP=2"),
        Case("neox-legacy", "neox-legacy", 4, "neox-to-hf", "legacy names (dense_h_to_4h), gpt-j-residual, TP=4"),
        Case("hf-to-neox", "te-full-parallel", 2, "hf-to-neox",
             "HF folder of te-full-parallel back to NeoX at TP=2 (inverse rules)"),
        Case("reshard", "te-full-parallel", 2, "neox-to-neox",
             "te-full-parallel re-sharded NeoX -> NeoX, TP=2 -> TP=4 (rule set + inverse, one streamed plan)"),
        Case("masters", "te-full", 2, "masters",
             "fp32 masters of a bf16 run (BF16_Optimizer, DP=2, TP=2) -> HF (--weights master)"),
    )
}


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


# ---- child processes (each a fresh interpreter) -------------------------------------------------
def child_main(argv: list[str]) -> None:
    """``--_child KIND RESULT_JSON ARGS_JSON``: baseline | convert | synth."""
    start = time.perf_counter()
    kind, result_path, args = argv[0], Path(argv[1]), json.loads(argv[2])
    if kind == "synth":
        result_path.write_text(json.dumps(synthesize(**args)))
        return
    if kind == "zero":
        result_path.write_text(json.dumps(synthesize_zero_run(**args)))
        return
    import torch

    import mapper
    from mapper.checkpoints import convert_checkpoint

    result: dict[str, Any] = {
        "import_s": time.perf_counter() - start,
        "rss_after_import": proc_status()["VmRSS"],
        "torch": torch.__version__,
        "mapper": mapper.__version__,
    }
    if kind == "convert":
        started: dict[str, Any] = {}

        def on_start(nbytes: int) -> None:  # called once the plan is ready, before any tensor is read
            started.update(t1=time.perf_counter(), status=proc_status())

        t0, usage0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        converted = convert_checkpoint(args["src"], args["dst"], on_start=on_start, **args["options"])
        t2, usage1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        report = converted.report
        result.update(
            rules=converted.prepared.rules.name,
            prepare_s=started["t1"] - t0,
            stream_s=t2 - started["t1"],
            convert_s=t2 - t0,
            user_s=usage1.ru_utime - usage0.ru_utime,
            system_s=usage1.ru_stime - usage0.ru_stime,
            rss_after_prepare=started["status"]["VmRSS"],
            groups=report.groups,
            bytes_written=report.bytes_written,
            peak_live_bytes=report.peak_live_bytes,
            largest_group_bytes=report.largest_group_bytes,
            sidecar_entries=len(report.sidecar),
        )
    status = proc_status()
    result.update(vmhwm=status["VmHWM"], rss_end=status["VmRSS"])
    result_path.write_text(json.dumps(result))


def run_process(command: list[str], env: dict[str, str] | None = None) -> tuple[int, float, int, float]:
    """(exit code, wall seconds, ru_maxrss bytes, CPU seconds) of a child process, reaped with wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    return proc.returncode, wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # Linux: kB


def run_child(kind: str, args: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child; its JSON plus ``wall_s`` (whole process) and ``ru_maxrss`` (bytes, from wait4)."""
    fd, name = tempfile.mkstemp(suffix=".json", prefix="mapper-bench-")
    os.close(fd)
    result_path = Path(name)
    try:
        code, wall, maxrss, _ = run_process(
            [sys.executable, str(HERE), "--_child", kind, str(result_path), json.dumps(args or {})], env
        )
        if code != 0:
            raise SystemExit(f"child {kind} failed with exit code {code}")
        result = json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)
    result["wall_s"] = wall
    result["ru_maxrss"] = maxrss
    return result


# ---- the synthetic checkpoints ------------------------------------------------------------------
def bench_overrides(variant: str, layers: int, hidden: int, tp: int) -> dict[str, Any]:
    """Pythia-like widths (head 128, 50k vocabulary); Llama-like for ``llama-*`` (GQA with a
    quarter of the heads as kv heads, MLP 2.75 x hidden, 32k vocabulary). Untied."""
    heads = hidden // HEAD_DIM
    common = dict(num_layers=layers, hidden_size=hidden, num_heads=heads, seq_length=2048,
                  max_position_embeddings=2048, make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY,
                  no_weight_tying=True)
    if variant.startswith("llama"):
        ffn = 256 * math.ceil(2.75 * hidden / 256)
        return dict(common, num_kv_heads=max(tp, heads // 4), orig_vocab_size=32000, intermediate_size=ffn)
    return dict(common, num_kv_heads=heads, orig_vocab_size=50277)


def bench_config(variant: str, layers: int, hidden: int, tp: int) -> Any:
    """The bf16 model of a case (see :func:`bench_overrides`)."""
    from mapper.testing import tiny_config

    return tiny_config(variant, tp=tp, precision="bfloat16", **bench_overrides(variant, layers, hidden, tp))


def synthesize_zero_run(root: str, variant: str, layers: int, hidden: int, tp: int, seed: int) -> dict[str, Any]:
    """A bf16 run with its BF16_Optimizer shards (mapper.testing.zero): fp32 masters and Adam moments
    of 2 data-parallel ranks beside the bf16 module weights. Returns the fp32 bytes of each layer."""
    from mapper.formats.naming import parse_neox_key
    from mapper.testing.zero import write_zero_run

    run = write_zero_run(variant, Path(root), tp=tp, dp=2, seed=seed, **bench_overrides(variant, layers, hidden, tp))
    sizes: dict[int, int] = {}
    for key, tensor in run.masters.items():
        idx = parse_neox_key(key).idx
        sizes[idx] = sizes.get(idx, 0) + tensor.nbytes
    return {"layer_bytes": {str(k): v for k, v in sorted(sizes.items())}, "block_index": run.config.block_layer_index(0)}


def layer_seed(seed: int, idx: int, rank: int, key: str) -> int:
    import zlib

    return (seed * 1_000_003 + idx * 7919 + rank * 104_729 + zlib.crc32(key.encode())) % (2**62)


def synthesize(root: str, variant: str, layers: int, hidden: int, tp: int, seed: int) -> dict[str, Any]:
    """Write the checkpoint under ``root`` layer by layer; returns the bytes of each layer.

    Template: the tensors mapper.testing.synthesize_neox makes for a 1-block model of the same
    width. Embeddings, final norm and output layer are taken as they are; every block reuses the
    template's 1-D tensors (norms, biases, empty ``_extra_state``, the stale norm of pre-fix TE
    checkpoints) and draws each matrix afresh, seeded by (seed, layer, rank, key). Each layer is
    saved with mapper.testing.write_neox_checkpoint (real file names and formats).
    """
    import torch

    from mapper.formats.naming import neox_key, parse_neox_key
    from mapper.testing import synthesize_neox, write_neox_checkpoint
    from mapper.testing.synth import variant as variant_spec

    spec = variant_spec(variant)
    config = bench_config(variant, layers, hidden, tp)
    one = bench_config(variant, 1, hidden, tp)
    template: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in synthesize_neox(one, naming=spec.naming, seed=seed, dtype=torch.bfloat16,
                                       extra_state=spec.extra_state).items():
        template.setdefault(parse_neox_key(key).idx, {})[key] = tensor
    moved = {0: 0, one.final_norm_layer_index: config.final_norm_layer_index,
             one.final_linear_layer_index: config.final_linear_layer_index}
    sizes: dict[int, int] = {}

    def save(idx: int, tensors: dict[str, torch.Tensor]) -> None:
        write_neox_checkpoint(tensors, config, Path(root))
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
    return {"layer_bytes": {str(k): v for k, v in sorted(sizes.items())}, "block_index": config.block_layer_index(0)}


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


def med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


# ---- one case at one depth ----------------------------------------------------------------------
def measure(
    case: Case, src: Path, work: Path, *, layers: int, options: dict[str, Any], group_bytes: int, block_bytes: int,
    repeats: int, can_drop: bool, warmup: bool, env: dict[str, str], log: Any, copy_src: Path | None = None,
) -> dict[str, Any]:
    """``copy_src``: what the cp baseline copies (default ``src``: the bytes a conversion reads)."""
    copy_dst, out = work / f"copy-{case.name}-{layers}L", work / f"out-{case.name}-{layers}L"
    copied = copy_src or src

    def run_cp() -> dict[str, Any]:
        prepare_cache(copied, can_drop)
        pressure = cpu_pressure()
        t0 = time.perf_counter()
        code, _, _, cpu = run_process(["cp", "-r", str(copied), str(copy_dst)])
        if code != 0:
            raise SystemExit(f"cp -r {copied} failed with exit code {code}")
        t1 = time.perf_counter()
        fsync_tree(copy_dst)
        t2 = time.perf_counter()
        return {"cp_s": t1 - t0, "cp_fsync_s": t2 - t0, "cp_cpu_s": cpu, "cpu_pressure_before": pressure}

    def run_convert() -> dict[str, Any]:
        prepare_cache(src, can_drop)
        pressure = cpu_pressure()
        result = run_child("convert", {"src": str(src), "dst": str(out), "options": options}, env)
        result.update(cpu_pressure_before=pressure, out_bytes=tree_bytes(out))
        return result

    if warmup:  # page-cache and guest-memory first touches, imports' disk reads: not measured
        for what in (run_cp, run_convert):
            remove(copy_dst)
            remove(out)
            what()
    cp_runs: list[dict[str, Any]] = []
    conv_runs: list[dict[str, Any]] = []
    for rep in range(repeats):
        for what in (("cp", "convert") if rep % 2 == 0 else ("convert", "cp")):
            remove(copy_dst)
            remove(out)
            if what == "cp":
                run = run_cp()
                cp_runs.append(run)
                log(f"  [{case.name} {layers}L] run {rep + 1}/{repeats} cp -r + fsync {run['cp_fsync_s']:.2f} s "
                    f"(cp alone {run['cp_s']:.2f} s; cpu pressure {run['cpu_pressure_before']}%)")
            else:
                run = run_convert()
                conv_runs.append(run)
                log(f"  [{case.name} {layers}L] run {rep + 1}/{repeats} convert {run['convert_s']:.2f} s = prepare "
                    f"{run['prepare_s']:.2f} + stream {run['stream_s']:.2f} (process {run['wall_s']:.2f} s), "
                    f"peak RSS {run['vmhwm'] / MB:.0f} MB (cpu pressure {run['cpu_pressure_before']}%)")
    out_bytes = conv_runs[-1]["out_bytes"]
    remove(copy_dst)
    keep_out = out if case.name == "te-full-parallel" else None  # verify reads it
    if keep_out is None:
        remove(out)
    return {
        "case": case.name,
        "description": case.description,
        "direction": case.direction,
        "tp": case.tp,
        "layers": layers,
        "src_bytes": tree_bytes(src),
        "copied_bytes": tree_bytes(copied),
        "out_bytes": out_bytes,
        "largest_layer_group_bytes": group_bytes,
        "block_bytes": block_bytes,
        "rules": conv_runs[-1]["rules"],
        "sidecar_entries": conv_runs[-1]["sidecar_entries"],
        "output_files": conv_runs[-1]["groups"],
        "cp_s": med(cp_runs, "cp_s"),
        "cp_fsync_s": med(cp_runs, "cp_fsync_s"),
        "convert_s": med(conv_runs, "convert_s"),
        "convert_min_s": min(r["convert_s"] for r in conv_runs),
        "cp_fsync_min_s": min(r["cp_fsync_s"] for r in cp_runs),
        "convert_cpu_s": statistics.median(r["user_s"] + r["system_s"] for r in conv_runs),
        "cp_cpu_s": med(cp_runs, "cp_cpu_s"),
        "prepare_s": med(conv_runs, "prepare_s"),
        "stream_s": med(conv_runs, "stream_s"),
        "process_s": med(conv_runs, "wall_s"),
        "peak_rss": int(med(conv_runs, "vmhwm")),
        "peak_rss_max": max(r["vmhwm"] for r in conv_runs),
        "peak_rss_wait4": int(med(conv_runs, "ru_maxrss")),
        "rss_after_prepare": int(med(conv_runs, "rss_after_prepare")),
        "peak_live_bytes": int(med(conv_runs, "peak_live_bytes")),
        "max_cpu_pressure": max((r["cpu_pressure_before"] or 0) for r in cp_runs + conv_runs),
        "cp_runs": cp_runs,
        "convert_runs": conv_runs,
        "kept_output": str(keep_out) if keep_out else None,
    }


def measure_verify(neox: Path, hf: Path, *, layers: int, can_drop: bool, log: Any) -> dict[str, Any]:
    """``mapper verify NEOX HF`` as a whole process: wall time, peak RSS (wait4), exit code."""
    mapper_cli = Path(sys.executable).parent / "mapper"
    command = [str(mapper_cli), "verify", str(neox), str(hf)] if mapper_cli.exists() else [
        sys.executable, "-m", "mapper.cli", "verify", str(neox), str(hf)]
    prepare_cache(neox, can_drop)
    code, wall, maxrss, _ = run_process(command)
    log(f"  [verify {layers}L] exit {code}, {wall:.1f} s, peak RSS {maxrss / MB:.0f} MB")
    return {"layers": layers, "exit_code": code, "wall_s": wall, "peak_rss": maxrss}


def judge(result: dict[str, Any], baseline_rss: int) -> dict[str, Any]:
    group = result["largest_layer_group_bytes"]
    budget = 2 * group + RSS_SLACK
    ratio = result["convert_s"] / result["cp_fsync_s"]
    return {
        "ratio": ratio,
        "best_ratio": result["convert_min_s"] / result["cp_fsync_min_s"],
        "cpu_ratio": result["convert_cpu_s"] / max(result["cp_cpu_s"], 1e-9),
        "process_ratio": result["process_s"] / result["cp_fsync_s"],
        "stream_ratio": result["stream_s"] / result["cp_fsync_s"],
        "time_ok": ratio <= TIME_TARGET,
        "budget": budget,
        "memory_ok": result["peak_rss"] <= budget,
        "above_baseline": result["peak_rss"] - baseline_rss,
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


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [(
        "case", "layers", "source", "group", "cp+fsync", "convert", "ratio", "time", "best/best", "CPU s",
        "process", "peak RSS", "budget", "memory", "Δ RSS 2x layers",
    )]
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in results["runs"]:
        by_case.setdefault(r["case"], []).append(r)
    for name, runs in by_case.items():
        for i, r in enumerate(runs):
            j = r["judgement"]
            flat = f"{(r['peak_rss'] - runs[0]['peak_rss']) / MB:+.0f} MB" if i else ""
            rows.append((
                name, str(r["layers"]), f"{r['src_bytes'] / GB:.2f} GB", f"{r['largest_layer_group_bytes'] / MB:.0f} MB",
                f"{r['cp_fsync_s']:.2f} s", f"{r['convert_s']:.2f} s", f"{j['ratio']:.2f}",
                "ok" if j["time_ok"] else "MISSED", f"{j['best_ratio']:.2f}",
                f"{r['convert_cpu_s']:.1f} / {r['cp_cpu_s']:.1f}", f"{r['process_s']:.2f} s", f"{r['peak_rss'] / MB:.0f} MB",
                f"{j['budget'] / MB:.0f} MB", "ok" if j["memory_ok"] else "MISSED", flat,
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"medians of {results['repeats']} runs; baseline RSS (python + import torch, mapper): "
        f"{results['baseline_rss'] / MB:.0f} MB; page cache: {results['cache']}",
        f"time target: convert <= {TIME_TARGET} x (cp -r + fsync) (medians; best/best: fastest run of each); "
        f"memory target: peak RSS <= 2 x largest layer group + {RSS_SLACK // MB} MB; CPU s: convert / cp (user + system)",
        "",
    ]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for v in results.get("verify", []):
        lines.append(f"mapper verify te-full-parallel {v['layers']} layers: {v['wall_s']:.1f} s, "
                     f"peak RSS {v['peak_rss'] / MB:.0f} MB (exit {v['exit_code']})")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks of the smaller depth (default 8)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size, a multiple of 128 x TP (default 2048)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each kind, alternating (default 3)")
    parser.add_argument("--child-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the conversion processes only (repeatable)")
    parser.add_argument("--no-double", action="store_true", help="skip the depth with twice the layers")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up runs")
    parser.add_argument("--no-verify", action="store_true", help="skip timing `mapper verify`")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()

    if args.hidden % (HEAD_DIM * max(c.tp for c in CASES.values())):
        parser.error(f"--hidden must be a multiple of {HEAD_DIM * 4} (head dim {HEAD_DIM} x the largest TP, 4)")
    depths = [args.layers] if args.no_double else [args.layers, 2 * args.layers]
    created = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="mapper-bench-")) if created else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # te-full at the larger depth: ~(12 h^2 L + 4 V h) bytes; source, copy, output, HF kept for the way back.
    # masters: the run holds 7x that (bf16 weights, fp32 masters, two fp32 moments), and its baseline
    # source, its copy and the output are fp32 (2x each).
    checkpoint = 12 * args.hidden**2 * depths[-1] + 4 * 50432 * args.hidden
    need = (5 + (13 if "masters" in args.cases else 0)) * checkpoint * 1.1
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"{work} has {shutil.disk_usage(work).free / GB:.1f} GB free; about {need / GB:.1f} GB needed")
    env = {"MAPPER_CACHE_DIR": str(work / "key-cache"), **dict(item.split("=", 1) for item in args.child_env)}

    def log(message: str) -> None:
        print(message, flush=True)

    can_drop = drop_caches()
    cache = ("dropped before every measured run (sync; echo 3 > /proc/sys/vm/drop_caches)" if can_drop
             else "dropping caches is not permitted here: the source was read once before every measured "
             "run instead, so every run started with it in the page cache (warm)")
    log(f"work dir {work}\npage cache: {cache}")
    baselines = [run_child("baseline") for _ in range(3)]
    baseline_rss = int(statistics.median(b["vmhwm"] for b in baselines))
    log(f"baseline RSS (python + import torch, mapper): {baseline_rss / MB:.0f} MB")
    results: dict[str, Any] = {
        "machine": {**machine(work), "torch": baselines[0]["torch"], "mapper": baselines[0]["mapper"]},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "repeats": args.repeats,
        "hidden": args.hidden,
        "child_env": env,
        "cache": cache,
        "cache_dropped": can_drop,
        "baseline_rss": baseline_rss,
        "runs": [],
        "verify": [],
    }
    wanted = [CASES[name] for name in args.cases]
    try:
        for layers in depths:
            sources: dict[str, tuple[Path, dict[str, Any]]] = {}
            for case in sorted(wanted, key=lambda c: c.direction == "hf-to-neox"):
                neox = work / f"neox-{case.variant}-tp{case.tp}-{layers}L"
                kind = "zero" if case.direction == "masters" else "synth"
                if kind == "zero":
                    neox = work / f"run-{case.variant}-tp{case.tp}-{layers}L"
                source_name = f"{kind}:{case.variant}"
                if source_name not in sources or sources[source_name][0] != neox:
                    remove(neox)
                    log(f"[{case.name} {layers}L] synthesising {case.variant} ({kind}), hidden {args.hidden}, TP={case.tp}")
                    made = run_child(kind, {"root": str(neox), "variant": case.variant, "layers": layers,
                                            "hidden": args.hidden, "tp": case.tp, "seed": args.seed})
                    os.sync()
                    sources[source_name] = (neox, made)
                _, made = sources[source_name]
                layer_bytes = made["layer_bytes"]
                group, block = max(layer_bytes.values()), layer_bytes[str(made["block_index"])]
                copy_src = None
                if case.direction == "neox-to-hf":
                    src, options = neox, {"max_shard_size": group}
                elif case.direction == "neox-to-neox":
                    src, options = neox, {"to": "neox", "tp": 2 * case.tp}
                elif case.direction == "masters":
                    src, options = neox, {"max_shard_size": group, "weights": "master"}
                    copy_src = work / f"written-{case.name}-{layers}L"
                    remove(copy_src)
                    log(f"[{case.name} {layers}L] converting once for the cp baseline (the bytes it writes; not measured)")
                    run_child("convert", {"src": str(src), "dst": str(copy_src), "options": options}, env)
                else:
                    src, options = work / f"hf-{case.variant}-{layers}L", {"tp": case.tp}
                    remove(src)
                    log(f"[{case.name} {layers}L] writing its HF source with mapper (not measured)")
                    run_child("convert", {"src": str(neox), "dst": str(src), "options": {}}, env)
                log(f"[{case.name} {layers}L] {tree_bytes(src) / GB:.2f} GB; largest layer group {group / MB:.0f} MB, "
                    f"one block {block / MB:.0f} MB")
                result = measure(case, src, work, layers=layers, options=options, group_bytes=group,
                                 block_bytes=block, repeats=args.repeats, can_drop=can_drop,
                                 warmup=not args.no_warmup, env=env, log=log, copy_src=copy_src)
                if copy_src is not None:
                    remove(copy_src)
                result["judgement"] = judge(result, baseline_rss)
                results["runs"].append(result)
                if result["kept_output"] and not args.no_verify:
                    results["verify"].append(measure_verify(neox, Path(result["kept_output"]), layers=layers,
                                                            can_drop=can_drop, log=log))
                if result["kept_output"]:
                    remove(Path(result["kept_output"]))
                if case.direction == "hf-to-neox":
                    remove(src)
            if not args.keep:
                for neox, _ in sources.values():
                    remove(neox)
    finally:
        for leftover in work.glob("copy-*"):
            remove(leftover)
        for leftover in work.glob("out-*"):
            remove(leftover)
        if created and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
