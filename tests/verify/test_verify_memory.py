"""Verification streams: its peak memory follows one layer of each model, not the model.

The same model at two depths is verified in a fresh process each; doubling the layers adds the
checkpoint's size again on disk but must leave the peak resident memory flat (no timing involved).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mapper
from mapper.testing import synthesize_neox, tiny_config, write_neox_checkpoint

WIDE = dict(hidden_size=1024, num_heads=8, num_kv_heads=8, intermediate_size=4096, no_weight_tying=True)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (the test process,
# which has just built the checkpoints), VmHWM belongs to the child's own address space.
CHILD = """
import json, re, sys
from mapper.verify import verify_checkpoints
report = verify_checkpoints(sys.argv[1], sys.argv[2], continuation=0)
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"ok": report.ok, "peak_kib": peak}))
"""


def peak_rss_mib(tmp_path: Path, layers: int) -> tuple[float, float]:
    """(peak RSS of a verification in MiB, size of the HF model in MiB) at ``layers`` blocks."""
    config = tiny_config("neox-parallel", num_layers=layers, **WIDE)
    neox = write_neox_checkpoint(synthesize_neox(config), config, tmp_path / f"neox-{layers}")
    hf = mapper.convert_checkpoint(neox, tmp_path / f"hf-{layers}").output
    size = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20
    done = subprocess.run([sys.executable, "-c", CHILD, str(neox), str(hf)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"]
    return result["peak_kib"] / 1024, size


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc/self/status (VmHWM)")
def test_peak_memory_stays_flat_when_layers_double(tmp_path: Path) -> None:
    shallow, shallow_size = peak_rss_mib(tmp_path, 3)
    deep, deep_size = peak_rss_mib(tmp_path, 6)
    added = deep_size - shallow_size  # ~150 MiB more weights in each model
    assert added > 100
    assert deep - shallow < 0.3 * added, (shallow, deep, added)
