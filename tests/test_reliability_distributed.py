"""Interrupted and failing runs at 2 real processes: a dead rank stops the others with a clear error in
bounded time, and so does a hung one (within --ddp_timeout); kill -9 (DDP) and SIGTERM (FSDP2) leave a checkpoint
that resumes with the one-process losses, on 2 processes or on 1 with the same global batch (another global batch:
tests/test_elastic_resume.py); a `toolkit prepare` store (--token_store) resumes exactly under DDP."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import REPO, free_port, one_error_line, run_recipe_in_process, run_script

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 40  # long enough that the interruption after step 4-5 lands before the end on a fast machine


def losses(output_dir) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def wait_for_losses(run, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while sum("'loss'" in line for line in list(run.out)) < n:
        assert run.poll() is None, f"run ended before it was interrupted: {run.stderr()[-2000:]}"
        assert time.time() < deadline, "run did not reach the step in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir, small_text_file):
    root = tmp_path_factory.mktemp("reliability-distributed")
    common = ["--preset", "gpt2-nano", "--tokenizer_name", str(tiny_tokenizer_dir),
              "--train_file", str(small_text_file),
              "--data_cache_dir", str(root / "cache"), "--block_size", "32", "--learning_rate", "3e-3",
              "--warmup_steps", "2", "--max_steps", str(STEPS), "--logging_steps", "1", "--eval_strategy", "no",
              "--report_to", "none", "--sample_max_new_tokens", "4", "--seed", "0",
              # one optimizer for every launch: auto picks Muon, which FSDP cannot shard
              "--optim", "adamw_torch_fused"]
    result = run_script(["recipes/pretrain.py", *common, "--per_device_train_batch_size", "8", "--save_strategy", "no",
                         "--output_dir", str(root / "reference")])
    assert result.returncode == 0, result.stderr[-3000:]
    return root, common, losses(root / "reference")


def assert_resumed_like_reference(out, reference, after_step: int) -> None:
    got = losses(out)
    for step in range(after_step + 1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), (step, got, reference)


def test_a_dead_rank_stops_the_other_with_a_clear_error_and_kill_9_resumes(setup, background, capsys):
    root, common, reference = setup
    out = root / "ddp"
    port = free_port()
    nodes = [background(["-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                         "recipes/pretrain.py", *common, "--use_cpu", "true", "--per_device_train_batch_size", "4",
                         "--save_steps", "2", "--save_total_limit", "3", "--output_dir", str(out)], new_session=True,
                        warm=True)
             for rank in (0, 1)]
    node0, node1 = nodes
    wait_for_losses(node0, 5)
    import psutil

    # torchrun starts workers in their own session (warm: its ranks' warm_python, whose runs die with them)
    workers = psutil.Process(node1.run_pid()).children(recursive=True)
    assert workers
    for worker in workers:
        worker.kill()  # rank 1 dies without a word (SIGKILL)
    killed_at = time.time()
    code = node0.wait(timeout=120)  # bounded: no hang on a collective
    elapsed = time.time() - killed_at
    assert code != 0 and elapsed < 120
    assert not (out / "model.safetensors").exists()  # it really was interrupted
    assert any("lost contact with another rank" in line for line in node0.err), node0.stderr()[-3000:]

    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out))
    assert last is not None and (root / "ddp" / os.path.basename(last) / "trainer_state.json").exists()
    result = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                         "recipes/pretrain.py", *common, "--use_cpu", "true", "--per_device_train_batch_size", "4",
                         "--save_steps", "2", "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_like_reference(out, reference, int(last.rsplit("-", 1)[1]))

    # The same 2-process checkpoint resumed by 1 process with the same global batch (4 x 2 accumulation steps) goes
    # on exactly as the 2 processes did (another global batch: tests/test_elastic_resume.py).
    checkpoint = out / f"checkpoint-{STEPS - 2}"  # (the resumed run keeps the last two)
    one = ["--per_device_train_batch_size", "4", "--save_strategy", "no", "--resume_from_checkpoint", str(checkpoint),
           "--cpu_keep_freed_memory", "false"]
    code, err = run_recipe_in_process("pretrain", [*common, *one, "--global_batch_size", "8",
                                                   "--output_dir", str(root / "one-process")], capsys)
    assert code == 0, err[-3000:]
    assert_resumed_like_reference(root / "one-process", reference, STEPS - 2)


def test_a_hung_rank_is_detected_within_ddp_timeout_and_every_rank_exits_with_one_line(setup, background):
    """Rank 1 stops answering (SIGSTOP: alive, sockets open, so nothing fails at once): rank 0 gives up after
    --ddp_timeout in its next collective and exits with one line; rank 1, once it runs again, finds its peer gone
    and does the same. The ranks are started as torchrun starts them (RANK, WORLD_SIZE, ... in the environment), so
    each one's whole stderr is its own."""
    root, common, _ = setup
    timeout = 12  # seconds; short for the test, long enough for two busy ranks to meet at each barrier
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    ranks = [background(["recipes/pretrain.py", *common, "--per_device_train_batch_size", "4", "--save_strategy", "no",
                         "--ddp_timeout", str(timeout), "--output_dir", str(root / "hang")],
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, warm=True) for rank in (0, 1)]
    wait_for_losses(ranks[0], 3)
    hung = ranks[1].run_pid()  # the rank itself (warm: the server's fork that warm_python relays)
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        code = ranks[0].wait(timeout=timeout + 90)  # before the fix: torch's 30-minute gloo default
    finally:
        os.kill(hung, signal.SIGCONT)
    elapsed = time.time() - stopped_at
    line = one_error_line(ranks[0].stderr())
    assert code == 2 and elapsed < timeout + 60, (code, elapsed, ranks[0].stderr()[-3000:])
    assert line.startswith("error: lost contact with another rank at step ")
    assert line.endswith("then rerun the same command with --resume_from_checkpoint auto")
    assert f"no answer within --ddp_timeout ({timeout} s)" in line
    assert ranks[1].wait(timeout=90) == 2
    assert one_error_line(ranks[1].stderr()).startswith("error (rank 1): lost contact with another rank at step ")


def test_sigterm_under_fsdp2_saves_a_sharded_checkpoint_and_resumes(setup, background, capsys):
    root, common, reference = setup
    out = root / "fsdp"
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "fsdp_cpu.yaml"),
              "--main_process_port", str(free_port()), "recipes/pretrain.py", *common, "--use_cpu", "true",
              "--per_device_train_batch_size", "4", "--save_steps", "1000", "--output_dir", str(out)]
    run = background(launch, new_session=True, warm=True)
    wait_for_losses(run, 4)
    import psutil

    # as a scheduler does: the launcher and every worker get it at once (warm, a worker gets it through its
    # warm_python, which relays it)
    launcher = psutil.Process(run.run_pid())
    for process in [launcher, *launcher.children(recursive=True)]:
        process.send_signal(signal.SIGTERM)
    run.wait(timeout=120)
    assert any("--resume_from_checkpoint auto" in line for line in run.out), (run.stdout()[-2000:],
                                                                               run.stderr()[-2000:])
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and list(checkpoints[0].rglob("*.distcp")), "no sharded checkpoint"
    stopped = int(checkpoints[0].name.split("-")[1])
    assert stopped < STEPS
    # FSDP shards are resumed under FSDP; a plain run would fail deep in the Trainer: refused in one line first
    code, err = run_recipe_in_process("pretrain", [*common, "--per_device_train_batch_size", "8",
                                                   "--resume_from_checkpoint", str(checkpoints[0]),
                                                   "--output_dir", str(root / "fsdp-without-fsdp"),
                                                   "--cpu_keep_freed_memory", "false"], capsys)
    assert code == 2 and "holds FSDP shards; resume it under FSDP" in one_error_line(err), err[-3000:]
    result = run_script([*launch[:4], "--main_process_port", str(free_port()), *launch[6:],
                         "--resume_from_checkpoint", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_like_reference(out, reference, stopped)


def test_token_store_resume_under_ddp_gives_the_one_process_losses(tmp_path, tiny_tokenizer_dir, small_text_file):
    """A `toolkit prepare` store trained on by 2 DDP ranks, resumed from its middle checkpoint by 2 ranks into a fresh
    output folder: the resumed steps' losses are those of the uninterrupted 2-rank run and of one process with the
    same global batch (the data position comes back with the checkpoint)."""
    store = tmp_path / "store"
    result = run_script(["-m", "toolkit", "prepare", str(small_text_file), "--output_dir", str(store),
                         "--tokenizer_name", str(tiny_tokenizer_dir), "--shard_tokens", "20000",
                         "--validation_fraction", "0.05", "--no_progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    common = ["--preset", "gpt2-nano", "--token_store", str(store), "--block_size", "32", "--learning_rate", "3e-3",
              "--warmup_steps", "2", "--max_steps", "12", "--logging_steps", "1", "--eval_strategy", "no",
              "--report_to", "none", "--sample_max_new_tokens", "4", "--seed", "0", "--optim", "adamw_torch_fused"]
    result = run_script(["recipes/pretrain.py", *common, "--per_device_train_batch_size", "8", "--save_strategy", "no",
                         "--output_dir", str(tmp_path / "one")])
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "recipes/pretrain.py", *common, "--use_cpu",
           "true", "--per_device_train_batch_size", "4", "--save_steps", "6"]
    result = run_script([*ddp[:4], "--master_port", str(free_port()), *ddp[4:], "--output_dir", str(tmp_path / "ddp")])
    assert result.returncode == 0, result.stderr[-3000:]
    middle = tmp_path / "ddp" / "checkpoint-6"
    result = run_script([*ddp[:4], "--master_port", str(free_port()), *ddp[4:], "--output_dir",
                         str(tmp_path / "resumed"), "--resume_from_checkpoint", str(middle)])
    assert result.returncode == 0, result.stderr[-3000:]
    logged = (result.stdout + result.stderr).count("{'loss'")
    assert logged == 6, logged  # it trained steps 7-12 only
    one, full, resumed = (losses(tmp_path / name) for name in ("one", "ddp", "resumed"))
    assert sorted(resumed) == list(range(1, 13))  # the checkpoint brings the log of steps 1-6 with it
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), (step, resumed, full)
        assert resumed[step] == pytest.approx(one[step], abs=1e-5), (step, resumed, one)
