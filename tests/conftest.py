"""Shared fixtures: tests run on CPU with few threads so that the suite fits 2 cores."""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402 - after the thread settings above

# The suite (and CI) draws the same examples every run, so a test never flakes; a developer
# hunting for new counterexamples runs `HYPOTHESIS_PROFILE=explore pytest`.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile(
    "explore", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
