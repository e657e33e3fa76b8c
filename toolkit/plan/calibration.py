"""The planner's fitted constants, read from calibration.json next to this file (shipped as package data).

Each section of the file holds its values and where they came from: date, machine and command, or a status
saying they are not measured yet. `python benchmarks/check_plan.py --write-calibration` refits the CPU sections
from its runs; a GPU check refits the "gpu" section with update_section(). The formulas in memory.py are
structural (what autograd saves, what the optimizer keeps) and are not fitted.
"""

from __future__ import annotations

import json
from pathlib import Path

GiB = 1024**3
MiB = 1024**2
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


def read(path: str | Path = CALIBRATION_FILE) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problem = str(err)
    else:
        if isinstance(data, dict) and isinstance(data.get("sections"), dict):
            return data
        problem = "no 'sections' object"
    raise RuntimeError(f"cannot read the planner's calibration file {path} ({problem}); reinstall gpt2-toolkit or "
                       f"restore toolkit/plan/calibration.json from git")


def constants(data: dict) -> dict:
    """The named constants memory.py and speed.py use, in bytes and fractions."""
    sec = {name: s["values"] for name, s in data["sections"].items()}
    cpu, gpu = sec["cpu_runtime"], sec["gpu"]
    return {
        # Framework/runtime memory of one training process, not counted by the tensor formulas.
        "CPU_OVERHEAD": {task: mib * MiB for task, mib in cpu["overhead_mib"].items()},
        "CPU_DISTRIBUTED_OVERHEAD": cpu["distributed_overhead_mib"] * MiB,
        # What a CUDA build of torch (PyPI's default on Linux) adds to it on a CPU: its CUDA libraries are resident.
        "CPU_CUDA_BUILD_EXTRA": {task: mib * MiB for task, mib in sec["cpu_runtime_cuda_build"]["extra_mib"].items()},
        "CPU_DEFAULT_MALLOC_MARGIN": sec["cpu_default_malloc_margin"]["fraction"],
        "TRL_CPU_HEAD_TILES": sec["cpu_trl_head"]["fallback_live_tiles"],
        "GPU_CONTEXT": gpu["context_gib"] * GiB,
        "GPU_ALLOCATOR_SLACK": gpu["allocator_slack"],
        # Model FLOPs utilisation assumed for the throughput estimate (labelled an estimate everywhere).
        "ASSUMED_MFU": {"cpu": sec["cpu_speed"]["assumed_mfu"], "cuda": gpu["assumed_mfu"]},
        # Bandwidths (GB/s) and latencies (ms) of the speed model's collectives and QLoRA's dequantization.
        "SPEED": {"cpu_collective_gbps": sec["cpu_speed"]["collective_gbps"],
                  "cpu_collective_latency_ms": sec["cpu_speed_fit"]["collective_latency_ms"],
                  "cpu_dequant_gbps": sec["cpu_speed_fit"]["dequant_gbps"],
                  "interconnect_gbps": gpu["interconnect_gbps"],
                  "gpu_collective_latency_ms": gpu["collective_latency_ms"], "gpu_memory_gbps": gpu["memory_gbps"]},
    }


def update_section(name: str, values: dict, *, date: str, machine: str, command: str, status: str = "measured",
                   notes: str | None = None, path: str | Path = CALIBRATION_FILE) -> dict:
    """Replace some values of one section and record how they were measured; returns the section written.

    Only keys the section already has are accepted, so a misspelt key cannot add a constant nothing reads.
    """
    data = read(path)
    if name not in data["sections"]:
        raise KeyError(f"no calibration section '{name}'; sections: {', '.join(data['sections'])}")
    section = data["sections"][name]
    unknown = set(values) - set(section["values"])
    if unknown:
        raise KeyError(f"section '{name}' has no value(s) {', '.join(sorted(unknown))}; "
                       f"it has {', '.join(section['values'])}")
    section["values"].update(values)
    section["status"] = status
    section["measured"] = {"date": date, "machine": machine, "command": command}
    if notes is not None:
        section["notes"] = notes
    constants(data)  # the file still yields every constant
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return section


_CONSTANTS = constants(read())
CPU_OVERHEAD: dict[str, float] = _CONSTANTS["CPU_OVERHEAD"]
CPU_DISTRIBUTED_OVERHEAD: float = _CONSTANTS["CPU_DISTRIBUTED_OVERHEAD"]
CPU_CUDA_BUILD_EXTRA: dict[str, float] = _CONSTANTS["CPU_CUDA_BUILD_EXTRA"]
CPU_DEFAULT_MALLOC_MARGIN: float = _CONSTANTS["CPU_DEFAULT_MALLOC_MARGIN"]
TRL_CPU_HEAD_TILES: float = _CONSTANTS["TRL_CPU_HEAD_TILES"]
GPU_CONTEXT: float = _CONSTANTS["GPU_CONTEXT"]
GPU_ALLOCATOR_SLACK: float = _CONSTANTS["GPU_ALLOCATOR_SLACK"]
ASSUMED_MFU: dict[str, float] = _CONSTANTS["ASSUMED_MFU"]
SPEED: dict = _CONSTANTS["SPEED"]
