"""Benchmark setup: the library versions and the accelerator go into pytest-benchmark's machine_info."""

from __future__ import annotations

import importlib


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    versions = {}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional peer is recorded as absent
            versions[name] = None
    machine_info["versions"] = versions
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = {
            "name": p.name,
            "memory_bytes": p.total_memory,
            "sm_count": p.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    else:
        machine_info["gpu"] = None
