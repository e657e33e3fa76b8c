"""What the GPU acceptance tests share: data and work folders, recipe runs (several at once), probe results, records.

The tests run the real recipes as subprocesses, wrapped by tests/gpu/probe.py where the test needs what only the
training process sees (how the Trainer placed and sharded the parameters, the trained model's logits before export).
Independent runs go to the GPU together (`run_jobs`): one H200 has room for four 124M runs, and correctness and
memory do not depend on what else runs; only the runs whose speed is reported run alone.

Folders (set by benchmarks/gpu_acceptance.py; a fresh temporary folder when pytest is run by hand):
  GPU_KIT_WORK     work folder: models, checkpoints, logs (never the output folder that comes back)
  GPU_KIT_DATA     folder holding gpt2-tokenizer/ and tinyshakespeare/input.txt (default: .gpu_kit/data in the
                   repository, which `gpu_acceptance.py --prepare` fills, else ../shared/data)
  GPU_KIT_RESULTS  JSON-lines file that receives every record() and every test outcome
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().with_name("probe.py")
CONFIGS = REPO / "accelerate_configs"
DONE = ".kit_done"  # marks a job's folder as finished, so a later pytest process of the same kit run reuses it


def data_dir() -> Path | None:
    """The folder with the GPT-2 tokenizer and Tiny Shakespeare, or None."""
    candidates = [os.environ.get("GPU_KIT_DATA"), REPO / ".gpu_kit" / "data", REPO.parent / "shared" / "data"]
    for cand in candidates:
        if (
            cand
            and (Path(cand) / "gpt2-tokenizer").is_dir()
            and (Path(cand) / "tinyshakespeare" / "input.txt").is_file()
        ):
            return Path(cand)
    return None


def skip_reason() -> str | None:
    """Why the gpu tests cannot run here (None: they can)."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception as err:  # noqa: BLE001 - a broken torch install is a reason, not a crash at collection
        return f"torch cannot be imported ({type(err).__name__})"
    if not cuda:
        return (
            "needs a CUDA GPU (torch.cuda.is_available() is False); on a GPU machine run "
            "python benchmarks/gpu_acceptance.py --out DIR (docs/gpu_acceptance.md)"
        )
    if data_dir() is None:
        return (
            "needs the GPT-2 tokenizer and Tiny Shakespeare: run python benchmarks/gpu_acceptance.py --prepare "
            "(copies them into .gpu_kit/data) or set GPU_KIT_DATA"
        )
    return None


def tokenizer_dir() -> Path:
    return data_dir() / "gpt2-tokenizer"


def shakespeare() -> Path:
    return data_dir() / "tinyshakespeare" / "input.txt"


_WORK: Path | None = None


def work_dir() -> Path:
    global _WORK
    if _WORK is None:
        _WORK = Path(os.environ.get("GPU_KIT_WORK") or tempfile.mkdtemp(prefix="gpu_kit_"))
        _WORK.mkdir(parents=True, exist_ok=True)
    return _WORK


def record(key: str, **values) -> None:
    """Append a named result (a measured figure, a ratio) to GPU_KIT_RESULTS; print it either way."""
    line = json.dumps({"record": key, **values}, default=float)
    print(f"record {line}", flush=True)
    path = os.environ.get("GPU_KIT_RESULTS") or str(work_dir() / "records.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def child_env() -> dict:
    """Offline (no Hub here), unbuffered, this checkout importable (also without `pip install -e .`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        HF_HOME=str(work_dir() / "hf_home"),
        WANDB_DISABLED="true",
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# Jobs: recipe runs as subprocesses, several at once
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    cmd: list[str]
    timeout: float = 300.0
    after: tuple[str, ...] = ()  # jobs that must have succeeded first
    folder: Path | None = None  # the job's output folder; gets the done-marker when it succeeds
    rc: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def log(self) -> Path:
        return work_dir() / f"{self.name}.log"

    def tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return (
            f"{self.name} rc={self.rc} after {self.seconds:.0f} s; command: {' '.join(self.cmd)}\n...{text[-chars:]}"
        )


def run_jobs(jobs: list[Job], max_parallel: int = 4) -> dict[str, Job]:
    """Start each job once the jobs it comes after have succeeded, at most max_parallel at a time.

    A job whose prerequisite failed is not started (rc -2); one past its timeout is killed (rc -9). A job whose folder
    holds the done-marker from an earlier pytest process of this kit run is reused (rc 0, not run again)."""
    by_name = {j.name: j for j in jobs}
    pending, running = list(jobs), {}
    try:
        _schedule(by_name, pending, running, max_parallel)
    except BaseException:  # a test timeout (pytest-timeout) or Ctrl-C: leave no training process behind
        for proc, log, _ in running.values():
            kill_tree(proc)
            log.close()
        raise
    return by_name


def _schedule(by_name: dict[str, Job], pending: list[Job], running: dict, max_parallel: int) -> None:
    while pending or running:
        for job in list(pending):
            if any(by_name[a].rc not in (None, 0) for a in job.after):
                job.rc = -2
                job.log.write_text(f"not started: {', '.join(job.after)} failed\n")
                pending.remove(job)
            elif all(by_name[a].rc == 0 for a in job.after) and len(running) < max_parallel:
                pending.remove(job)
                if job.folder is not None and (job.folder / DONE).exists():
                    job.rc = 0
                    continue
                log = open(job.log, "w")  # noqa: SIM115 - open while the job runs, closed when it ends
                log.write(" ".join(job.cmd) + "\n")
                log.flush()
                # Same process group as pytest: when the kit stops pytest at its time limit, these go too.
                proc = subprocess.Popen(job.cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
                running[job.name] = (proc, log, time.perf_counter())
        for name, (proc, log, start) in list(running.items()):
            job = by_name[name]
            if proc.poll() is None and time.perf_counter() - start > job.timeout:
                kill_tree(proc)
                log.write(f"\nkilled after {job.timeout:.0f} s (the job's timeout)\n")
                job.rc = -9
            elif proc.poll() is not None:
                job.rc = proc.returncode
            else:
                continue
            job.seconds = time.perf_counter() - start
            log.close()
            del running[name]
            if job.ok and job.folder is not None and job.folder.is_dir():
                (job.folder / DONE).write_text("")
        time.sleep(0.2)


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process and everything it started (accelerate launch -> torchrun -> worker)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [*family, psutil.Process(proc.pid)] if proc.poll() is None else family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def python(*args: str) -> list[str]:
    return [sys.executable, *map(str, args)]


def probed(probe_dir: Path, recipe: str, args: list[str], launcher: list[str] | None = None) -> list[str]:
    """The command that runs `recipe args` under the probe, optionally through `accelerate launch ...`."""
    if launcher:
        return python("-m", "accelerate.commands.launch", *launcher, PROBE, "--probe_dir", probe_dir, recipe, *args)
    return python(PROBE, "--probe_dir", probe_dir, recipe, *args)


def accelerate_launch(config: str) -> list[str]:
    """One process on the one GPU, with the given accelerate config (FSDP2 with one rank is still fully_shard)."""
    return ["--config_file", str(CONFIGS / config), "--num_processes", "1", "--main_process_port", str(free_port())]


def pretrain_args(output_dir: Path, batch: int, steps: int, *extra: str) -> list[str]:
    """pretrain.py at the GPT-2 shape on Tiny Shakespeare with the GPT-2 tokenizer: bf16 autocast, sdpa, block 1024."""
    cache = output_dir.parent / f"cache-{output_dir.name}"  # one per run: runs at the same time never share a cache
    return ["--tokenizer_name", str(tokenizer_dir()), "--train_file", str(shakespeare()), "--block_size", "1024",
            "--per_device_train_batch_size", str(batch), "--max_steps", str(steps), "--bf16", "true",
            "--attn_implementation", "sdpa", "--seed", "0", "--report_to", "none", "--eval_strategy", "no",
            "--save_strategy", "no", "--sample_max_new_tokens", "1", "--data_cache_dir", str(cache),
            "--output_dir", str(output_dir), "--overwrite_output_dir", "true", *extra]


# --------------------------------------------------------------------------------------------------------------
# Reading results
# --------------------------------------------------------------------------------------------------------------


def probe(probe_dir: Path) -> dict:
    return json.loads((probe_dir / "probe.json").read_text())


def probe_logits(probe_dir: Path):
    from safetensors.torch import load_file

    return load_file(probe_dir / "logits.safetensors")["logits"]


def trainer_log(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def losses(output_dir: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer_log(output_dir) if "loss" in h}


def fixed_ids(vocab_size: int, device="cpu"):
    """The tokens every logits comparison uses: 2 x 128 ids spread over the real GPT-2 vocabulary."""
    import torch

    return ((torch.arange(256) * 7919 + 13) % min(vocab_size, 50257)).view(2, 128).to(device)


def checksums(named_tensors) -> dict[str, list[float]]:
    """(sum, sum of squares) per tensor in float64: equal checksums = the same weights, to summation order."""
    out = {}
    for name, t in named_tensors:
        t = t.detach().double()
        out[name] = [t.sum().item(), (t * t).sum().item()]
    return out


def make_init(folder: Path, preset: str = "gpt2") -> Path:
    """A fresh GPT-2 as recipes/pretrain.py builds one (padded vocabulary, dropout 0, fused GELU), seed 0, saved with
    the GPT-2 tokenizer: the common starting point of runs whose losses are compared step by step."""
    if (folder / DONE).exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit import presets

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = presets.build_gpt2_config(preset, len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / DONE).write_text("")
    return folder
