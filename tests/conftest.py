"""Shared test settings. Hypothesis runs the CI profile (>= 200 examples per property) by default.

The expected-key cache (:mod:`mapper.hf_models`) goes to a folder of this test run, not the
user's ~/.cache, and is removed afterwards (CLI subprocesses inherit the variable).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings

_CACHE = tempfile.mkdtemp(prefix="mapper-test-cache-")
os.environ["MAPPER_CACHE_DIR"] = _CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce locally
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
