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
  GPU_KIT_LAUNCHED set by the kit: here a test that cannot run on CUDA fails instead of rehearsing or skipping
  GPU_KIT_DEADLINE set by the kit per step (epoch seconds, the step's limit less a margin): every job still running
                   then is killed, so the tests fail with the job's log and their outcomes are written

Where torch sees no CUDA (CI, laptops) and the kit did not launch them, the same tests run as a CPU rehearsal
(`shape()`): a nano GPT-2 with a 512-token BPE trained on the data, a few steps of short blocks, through the same
recipes and launchers (bf16 autocast on CPU, FSDP2 over gloo, bitsandbytes' CPU 4-bit backend). What only CUDA can
give (device memory counters, NVML, MFU against the card's peak, paged memory, NCCL) is named by `not_measured` and
listed at the end of the pytest output, never asserted.
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
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().with_name("probe.py")
CONFIGS = REPO / "accelerate_configs"
DONE = ".kit_done"  # marks a job's folder as finished, so a later pytest process of the same kit run reuses it


LAUNCHED_BY_KIT = "GPU_KIT_LAUNCHED"
REHEARSAL = "GPU_KIT_REHEARSAL"  # set for the recipes' processes of a CPU rehearsal (tests/gpu/probe.py reads it)


@dataclass(frozen=True)
class Shape:
    """What the tests run at: the GPU sizes, or the CPU rehearsal's tiny ones. Same code paths, other numbers."""

    device: str  # "cuda" or "cpu"
    preset: str  # the model called 124M in the tests
    preset_medium: str  # the model called 350M in the tests
    n_layer: int  # of `preset`: 4-bit layers and LoRA tensors are counted per block
    block: int
    batch: int  # the core runs' micro-batch (eager, fsdp, offload, onefile)
    steps: int  # eager, fsdp, resumed, onefile: one schedule (the cosine depends on max_steps)
    checkpoint_at: int  # fsdp's sharded checkpoint, which `resumed` continues from
    warmup: int
    compiled_batch: int
    compiled_steps: int
    log_every: int
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    plan_steps: int
    tokenizer_len: int  # the tokenizer's length; the model's vocabulary is it padded to a multiple of 64
    pretrain_drop: float  # how far pretrain.py's logged loss must fall over the compiled run
    core_drop: float  # ... over the core runs' `steps` (fsdp, onefile)
    finetune_drop: float  # how far LoRA / QLoRA must lower the held-out loss
    job_timeout: float  # by hand; under the kit each step's deadline (GPU_KIT_DEADLINE) comes first
    core_lr: tuple[str, ...] = ()  # pretrain.py's and onefile's learning rate flags (GPU: their default by width)

    @property
    def rehearsal(self) -> bool:
        return self.device == "cpu"

    @property
    def vocab(self) -> int:
        return -(-self.tokenizer_len // 64) * 64


GPU_SHAPE = Shape(device="cuda", preset="gpt2", preset_medium="gpt2-medium", n_layer=12, block=1024, batch=8, steps=10,
                  checkpoint_at=5, warmup=5, compiled_batch=16, compiled_steps=30, log_every=5, finetune_steps=30,
                  finetune_batch=8, finetune_lr=1e-3, plan_steps=10, tokenizer_len=50257, pretrain_drop=1.0,
                  core_drop=0.5, finetune_drop=0.05, job_timeout=300)
# Seconds on 2 CPU cores: 512-token vocabulary (the head dominates a nano model's step), 64-token blocks, lr 1e-2
# so that 10 steps leave a base with some structure to fine-tune. A LoRA on a 2-block, 64-wide base with frozen
# embeddings and head moves the held-out loss by a few hundredths (15 steps of 8 x 64 at lr 2e-2: 0.023), hence 0.01.
CPU_SHAPE = Shape(device="cpu", preset="gpt2-nano", preset_medium="gpt2-nano", n_layer=2, block=64, batch=4, steps=10,
                  checkpoint_at=5, warmup=2, compiled_batch=4, compiled_steps=10, log_every=2, finetune_steps=15,
                  finetune_batch=8, finetune_lr=2e-2, plan_steps=3, tokenizer_len=512, pretrain_drop=0.5,
                  core_drop=0.5, finetune_drop=0.01, job_timeout=240, core_lr=("--learning_rate", "1e-2"))
REHEARSAL_TEXT_CHARS = 200_000  # of Tiny Shakespeare: the rehearsal's tokenizer and training text


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken torch install is "no CUDA" here; blocked() names it
        return False


@lru_cache(maxsize=1)
def shape() -> Shape:
    return GPU_SHAPE if cuda_available() else CPU_SHAPE


def blocked() -> tuple[str, str] | None:
    """("fail" | "skip", why) when the tests cannot run here; None when they can (on CUDA, or as the CPU rehearsal).

    Launched by the kit, anything short of CUDA and the data is a failure: a skip would let a step look green having
    tested nothing. Elsewhere, without CUDA the tests rehearse on CPU; only missing data skips them."""
    try:
        import torch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken torch install is a reason, not a crash at collection
        reason = f"torch cannot be imported ({type(err).__name__})"
        return ("fail" if os.environ.get(LAUNCHED_BY_KIT) else "skip"), reason
    if os.environ.get(LAUNCHED_BY_KIT) and not cuda_available():
        return "fail", ("launched by the GPU kit but torch.cuda.is_available() is False: the kit measures the GPU "
                        "(without the kit these tests rehearse on CPU: python -m pytest tests/gpu)")
    if data_dir() is None:
        return ("fail" if os.environ.get(LAUNCHED_BY_KIT) else "skip"), (
            "needs the GPT-2 tokenizer and Tiny Shakespeare: run python benchmarks/gpu_acceptance.py --prepare "
            "(copies them into .gpu_kit/data) or set GPU_KIT_DATA"
        )
    return None


NOT_MEASURED: list[str] = []


def not_measured(what: str) -> None:
    """Name a CUDA-only measurement the CPU rehearsal replaces (listed at the end of pytest's output, recorded)."""
    NOT_MEASURED.append(what)
    record("not_measured_on_cpu", what=what)


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


def tokenizer_dir() -> Path:
    """The GPT-2 tokenizer; in the rehearsal a 512-token byte-level BPE trained on the rehearsal's text."""
    if not shape().rehearsal:
        return data_dir() / "gpt2-tokenizer"
    folder = work_dir() / "rehearsal-tokenizer"
    if not (folder / DONE).exists():
        from toolkit.tokenizer import train_bpe_tokenizer

        train_bpe_tokenizer([shakespeare().read_text()], vocab_size=CPU_SHAPE.tokenizer_len).save_pretrained(folder)
        (folder / DONE).write_text("")
    return folder


def shakespeare() -> Path:
    """Tiny Shakespeare; in the rehearsal its first REHEARSAL_TEXT_CHARS characters (tokenized in a blink)."""
    full = data_dir() / "tinyshakespeare" / "input.txt"
    if not shape().rehearsal:
        return full
    part = work_dir() / "shakespeare-part.txt"
    if not part.exists():
        part.write_text(full.read_text(encoding="utf-8")[:REHEARSAL_TEXT_CHARS], encoding="utf-8")
    return part


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
    if shape().rehearsal:
        env[REHEARSAL] = "1"
        env["OMP_NUM_THREADS"] = "1"  # two jobs at a time on two cores: more threads only contend
    if _WARM:  # where warm_python finds the server (interpreter())
        env.update(_WARM[0].shim_env())
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# Jobs: recipe runs as subprocesses, several at once
# --------------------------------------------------------------------------------------------------------------


def step_deadline() -> float | None:
    """When the kit wants this step's jobs gone (time.time() seconds): its cap less a margin for the tests to fail
    and report (benchmarks/gpu_acceptance.py JOB_MARGIN_S)."""
    value = os.environ.get("GPU_KIT_DEADLINE")
    return float(value) if value else None


@dataclass
class Job:
    name: str
    cmd: list[str]
    timeout: float = 0.0  # 0: the shape's job_timeout
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
        deadline = step_deadline()
        for name, (proc, log, start) in list(running.items()):
            job = by_name[name]
            timeout = job.timeout or shape().job_timeout
            if proc.poll() is None and deadline is not None and time.time() > deadline:
                kill_tree(proc)
                log.write(f"\nkilled at the kit step's deadline, after {time.perf_counter() - start:.0f} s\n")
                job.rc = -9
            elif proc.poll() is None and time.perf_counter() - start > timeout:
                kill_tree(proc)
                log.write(f"\nkilled after {timeout:.0f} s (the job's timeout)\n")
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
    return [interpreter(), *map(str, args)]


_WARM: list = []


def interpreter() -> str:
    """How the jobs start python. On a GPU, a new interpreter per job, as a user's runs start. In the CPU rehearsal
    tests/warm_python, with a fork server made for the jobs' environment (tests/warm_start.py): each job is still a
    process of its own that runs its command unchanged; only the ~10 s of imports of torch, transformers, peft, ...
    are made once (nothing the rehearsal checks depends on them). GPT2_TOOLKIT_TESTS_FRESH=1: a new one there too."""
    if not shape().rehearsal:
        return sys.executable
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    import warm_start

    if not warm_start.enabled():
        return sys.executable
    if not _WARM:
        import atexit
        import shutil

        folder = tempfile.mkdtemp(prefix="gpu-kit-warm-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _WARM.append(warm_start.Server(child_env(), folder))
        atexit.register(_WARM[0].stop)
    return str(warm_start.SHIM) if _WARM[0].ready else sys.executable


def probed(probe_dir: Path, recipe: str, args: list[str], launcher: list[str] | None = None) -> list[str]:
    """The command that runs `recipe args` under the probe, optionally through `accelerate launch ...`."""
    if launcher:
        return python("-m", "accelerate.commands.launch", *launcher, PROBE, "--probe_dir", probe_dir, recipe, *args)
    return python(PROBE, "--probe_dir", probe_dir, recipe, *args)


def accelerate_launch(config: str) -> list[str]:
    """One process on the one GPU, with the given accelerate config (FSDP2 with one rank is still fully_shard); in
    the rehearsal one CPU process (gloo), which the recipe turns into FSDP2 (toolkit.distributed.enable_cpu_fsdp2)."""
    return ["--config_file", str(CONFIGS / config), "--num_processes", "1", "--main_process_port", str(free_port())]


def pretrain_args(output_dir: Path, batch: int, steps: int, *extra: str) -> list[str]:
    """pretrain.py on Tiny Shakespeare: bf16 autocast, sdpa, AdamW, the shape's block (GPU: 1024, GPT-2 tokenizer)."""
    cache = output_dir.parent / f"cache-{output_dir.name}"  # one per run: runs at the same time never share a cache
    rehearsal = ["--use_cpu", "true"] if shape().rehearsal else []  # torchrun does not pass accelerate's use_cpu on
    return ["--tokenizer_name", str(tokenizer_dir()), "--train_file", str(shakespeare()), "--block_size",
            str(shape().block), "--per_device_train_batch_size", str(batch), "--max_steps", str(steps), "--bf16",
            "true", "--attn_implementation", "sdpa", "--optim", "adamw_torch_fused", "--seed", "0", "--report_to",
            "none", "--eval_strategy", "no", "--save_strategy", "no", "--sample_max_new_tokens", "1",
            "--data_cache_dir", str(cache), "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
            *rehearsal, *extra]


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


def max_steps(output_dir: Path) -> int:
    return json.loads((output_dir / "trainer_state.json").read_text())["max_steps"]


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


def onefile_start(preset: str | None = None) -> list[str]:
    """The onefile_train.py flags that decide its initial weights: the shape, the tokenizer (its vocabulary) and the
    seed. A run with these flags starts from the weights make_init saves (it draws them again from the seed)."""
    return ["--preset", preset or shape().preset, "--tokenizer_name", str(tokenizer_dir()), "--seed", "0"]


def make_init(folder: Path, preset: str | None = None) -> Path:
    """The common starting point of runs whose losses are compared step by step: onefile_train.py's initial weights
    (`--max_steps 0` with onefile_start's flags), saved with pretrain.py's config (padded vocabulary, dropout 0, fused
    GELU) and the tokenizer, so pretrain.py runs start from them with --model_name_or_path and onefile runs with
    onefile_start(preset)."""
    if (folder / DONE).exists():
        return folder
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit import presets

    spec = importlib.util.spec_from_file_location("onefile_train", REPO / "recipes" / "onefile_train.py")
    onefile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(onefile)
    drawn = folder.with_name(folder.name + "-onefile")
    onefile.main([*onefile_start(preset), "--train_file", str(shakespeare()), "--max_steps", "0", "--device", "cpu",
                  "--sample_max_new_tokens", "0", "--overwrite_output_dir", "--output_dir", str(drawn)])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = presets.build_gpt2_config(
        preset or shape().preset, len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(drawn, dtype=torch.float32).state_dict())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / DONE).write_text("")
    return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit import presets

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = presets.build_gpt2_config(
        preset or shape().preset, len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / DONE).write_text("")
    return folder
