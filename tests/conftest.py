"""Shared test settings: hypothesis profiles, the `gpu` marker, and the order and threads of xdist workers."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before kernels/ is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings


def _import_installed_kernels() -> None:
    """Bind the name `kernels` to Hugging Face's `kernels` distribution when it is installed.

    pytest puts the repo root on sys.path, where this repo's kernels/ folder (installed as nanomoe_kernels) would
    shadow it, and transformers >= 5.25 imports it in every model. Nothing here imports the folder as `kernels`.
    """
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.realpath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers below 5.25 does not need it
        pass
    finally:
        sys.path[:] = saved


_import_installed_kernels()

settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# under pytest-xdist (the README's `-n 2`) two workers share the cores: one intra-op thread each
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, modules with a `slow` test first; skip `gpu` tests where CUDA is missing.

    `--dist loadfile` keeps a module on one worker (its module-scoped fixtures run once) and
    `--no-loadscope-reorder` hands modules out in this order: the long ones start first, so the run
    does not end with one worker busy on a long module while the other idles.
    """
    if XDIST_WORKER:
        slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.module not in slow_modules)  # stable: same order within each part
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
