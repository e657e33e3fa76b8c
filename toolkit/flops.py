"""FLOPs per token, peak FLOP rates and MFU (model FLOPs utilisation).

FLOPs per trained token follow the PaLM appendix / nanoGPT: 6*N for the weight matmuls
(forward 2N + backward 4N) plus 12*n_layer*n_embd*T for attention scores and values at sequence
length T. N counts every parameter that takes part in a matmul: the token embedding (it is also
the tied LM head) but not the position table, which is only indexed.

Peak rates: on CPU we measure fp32 matmul throughput (there is no spec sheet for "2 cloud cores");
on GPUs we use the dense bf16 tensor-core figure from the vendor's data sheet.
"""

from __future__ import annotations

import functools
import time

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from vendor data sheets.
GPU_PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16; V100 has no bf16
    "T4": 65e12,  # fp16; T4 has no bf16
}


def flops_per_token(n_layer: int, n_embd: int, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6*N (N without the position table) + 12*L*d*T attention."""
    from toolkit.presets import count_parameters

    n_matmul_params = count_parameters(n_layer, n_embd, vocab_size, n_positions=0)
    return 6.0 * n_matmul_params + 12.0 * n_layer * n_embd * seq_len


def flops_per_token_for(config, seq_len: int) -> float:
    return flops_per_token(config.n_layer, config.n_embd, config.vocab_size, seq_len)


@functools.lru_cache(maxsize=None)
def measure_cpu_peak_flops(size: int = 2048, seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s on this CPU with torch's current thread settings (takes ~`seconds`)."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm up the kernel and thread pool
    n, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 2:
            return 2.0 * size**3 * n / elapsed


def gpu_peak_flops(device_name: str) -> float | None:
    """Data-sheet bf16 peak for a CUDA device name like 'NVIDIA H100 80GB HBM3', or None if unknown."""
    name = device_name.upper()
    for key in sorted(GPU_PEAK_BF16_FLOPS, key=len, reverse=True):
        if all(part in name for part in key.upper().split()):
            return GPU_PEAK_BF16_FLOPS[key]
    return None


def peak_flops(device: str = "auto") -> tuple[float | None, str]:
    """(peak FLOP/s, how it was obtained) for the device training runs on."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = gpu_peak_flops(name)
        return peak, (f"{name} bf16 data sheet" if peak else f"{name}: unknown peak")
    return measure_cpu_peak_flops(), "CPU fp32 matmul, measured"


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(size: int = 256) -> float:
    """bf16 / fp32 matmul throughput on this CPU (>1: bf16 pays off). Measured, because CPU flags lie: a CPU can
    report avx512_bf16, and oneDNN call bf16 supported, while its bf16 matmuls run many times slower than fp32
    (docs/benchmarks.md, figures behind code comments)."""
    import torch

    def rate(dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        start, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - start < 0.02:
            torch.mm(a, b)
            n += 1
        return n / (time.perf_counter() - start)

    return rate(torch.bfloat16) / rate(torch.float32)
