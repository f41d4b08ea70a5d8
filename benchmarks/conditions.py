"""The conditions every benchmark result carries: machine, versions, date."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
from importlib import metadata


def conditions(**extra) -> dict:
    """Machine, library versions and the date, plus the benchmark's own settings."""
    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "triton", "ray", "compose-serve"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "gpu": gpu},
        "python": platform.python_version(),
        "versions": versions,
        **extra,
    }


def summary(values: list[float]) -> dict:
    """Median, spread (min, max) and p90 of repeated measurements."""
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "p90": p90,
            "n": len(ordered)}
