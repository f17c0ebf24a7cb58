"""The README's library calls work as written."""

from __future__ import annotations

import subprocess
import sys


def test_mapper_verify_is_reachable_from_import_mapper() -> None:
    code = ("import mapper; from mapper.verify import VerifyReport; "
            "assert callable(mapper.verify.verify_checkpoints) and callable(mapper.verify.verify_against_reference)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
