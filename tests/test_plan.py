"""`toolkit plan`: the memory formulas, the recommendation and the command-line behaviour.

Unit tests call the planner in-process (no training); one slow test runs benchmarks/check_plan.py --quick, two
real pretrain.py and two real qlora.py runs whose measured peaks are compared with the prediction.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit import plan
from toolkit.commands import plan as plan_command
from toolkit.plan import calibration
from toolkit.presets import PRESETS, count_parameters

GiB, MiB = plan.GiB, plan.MiB
REPO = Path(__file__).resolve().parents[1]


def shape(name="gpt2", task="pretrain", **kw):
    return plan.load_shape(name, task, **kw)


def setup(**kw):
    base = {"task": "pretrain", "device": "cuda", "num_devices": 1, "device_memory": 80 * GiB, "batch_size": 8,
            "seq_len": 1024}
    base.update(kw)
    return plan.Setup(**base)


def test_124m_parameter_count_matches_openai_gpt2():
    # the Hub's gpt2 (vocab 50257, tied head) has 124,439,808 parameters; pretraining pads the vocab to 50304
    assert shape("gpt2", "full").n_params == 124_439_808
    assert shape("gpt2", "pretrain").n_params == 124_439_808 + (50304 - 50257) * 768


def test_local_config_json_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 3, "n_embd": 96, "n_head": 4, "vocab_size": 1000, "n_positions": 64}))
    sh = plan.load_shape(str(tmp_path), "lora")
    assert (sh.n_layer, sh.n_embd, sh.vocab_size) == (3, 96, 1000)
    assert sh.n_params == count_parameters(3, 96, 1000, 64)


def test_fsdp2_sharded_state_shrinks_as_one_over_n():
    sh = shape("gpt2-xl")
    per_rank = {n: plan.estimate(sh, setup(num_devices=n), "fsdp") for n in (2, 4, 8)}
    held = {n: est.components["parameters"] + est.components["optimizer"] for n, est in per_rank.items()}
    # the working set (gathered root and blocks) is the same on any number of ranks; the fp32 master shards and the
    # AdamW state (4 + 8 bytes per parameter) are split n ways: going from n to 2n ranks frees 12 N / 2n per rank
    assert held[2] - held[4] == pytest.approx(12 * sh.n_params / 4, rel=1e-9)
    assert held[4] - held[8] == pytest.approx(12 * sh.n_params / 8, rel=1e-9)


def test_ddp_holds_full_state_and_a_bucket_copy_of_gradients():
    sh = shape("gpt2")
    single = plan.estimate(sh, setup(num_devices=4), "single")
    ddp = plan.estimate(sh, setup(num_devices=4), "ddp")
    assert ddp.components["optimizer"] == single.components["optimizer"] == 8 * sh.n_params
    assert ddp.components["gradients"] == pytest.approx(2 * single.components["gradients"])


def test_qlora_weights_are_about_an_eighth_of_fp32_plus_constants():
    """The planner's 4-bit weights and quantization constants are the bytes bitsandbytes itself makes from one block's
    linear weights (quantize_4bit on CPU), times the number of blocks."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    sh = shape("gpt2-mini", "qlora")
    s = setup(task="qlora", device="cpu", precision="fp32", lora_r=8)
    q = plan.estimate(sh, s, "single")
    lora = plan.estimate(sh, setup(task="lora", device="cpu", precision="fp32", lora_r=8), "single")
    single_quant = plan.estimate(sh, plan.Setup(**{**s.__dict__, "double_quant": False}), "single")
    d = sh.n_embd
    weights = [torch.zeros(d, 3 * d), torch.zeros(d, d), torch.zeros(d, 4 * d), torch.zeros(4 * d, d)]
    packed = constants = single_constants = 0
    for w in weights:
        qw, state = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        packed += w.nbytes - qw.nbytes
        constants += state.absmax.nbytes + state.state2.absmax.nbytes  # 8-bit absmax, and its fp32 absmax
        _, plain = quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        single_constants += plain.absmax.nbytes
    # only the linear weights differ between LoRA and QLoRA: fp32 against packed 4-bit
    assert lora.components["parameters"] - q.components["parameters"] == pytest.approx(sh.n_layer * packed)
    assert q.components["quantization"] == pytest.approx(sh.n_layer * constants, rel=1e-3)
    assert single_quant.components["quantization"] == pytest.approx(sh.n_layer * single_constants, rel=1e-3)


def test_activations_grow_with_batch_and_checkpointing_cuts_them():
    sh = shape("gpt2")
    s = setup()
    a1 = plan.activation_terms(sh, s, 4, False)["layers"]
    a2 = plan.activation_terms(sh, s, 8, False)["layers"]
    assert a2 == pytest.approx(2 * a1)
    ck = plan.activation_terms(sh, s, 8, True)["layers"]
    assert ck < a2 / 5
    # eager attention keeps its T x T softmax: more than sdpa (the bytes themselves are checked against autograd in
    # test_activation_formula_matches_what_autograd_saves)
    assert plan.activation_terms(sh, setup(attn="eager"), 8, False)["layers"] > 2 * a2


@pytest.mark.parametrize("model,n,mem,batch,expect", [
    ("gpt2", 1, "80GB", 8, "single"),  # 124M on one 80 GB card: no distribution needed
    ("gpt2", 4, "80GB", 8, "ddp"),  # fits one card, several cards: DDP, not FSDP2
    ("gpt2-xl", 4, "8GB", 1, "fsdp"),  # 1.5B: 25 GB of fp32 weights + AdamW cannot sit on an 8 GB card
    ("gpt2-xl", 2, "8GB", 1, "fsdp_offload"),  # ... on 2 cards even the shards (12 GB each) need CPU RAM
    ("gpt2-xl", 1, "80GB", 4, "single"),
])
def test_recommendation(model, n, mem, batch, expect):
    s = setup(num_devices=n, device_memory=plan.parse_memory(mem), batch_size=batch, seq_len=1024)
    p = plan.make_plan(shape(model), s)
    assert p.choice is not None and p.choice.strategy == expect, p.reasons
    assert p.choice.fits and p.choice.total <= s.device_memory
    # every strategy tried before the choice was refused with its number
    chosen = p.reasons.index(next(r for r in p.reasons if " fits in " in r))
    assert all("does not fit" in r for r in p.reasons[:chosen])


def test_1p5b_on_4x8gb_uses_fsdp2_config_and_command():
    p = plan.make_plan(shape("gpt2-xl"), setup(num_devices=4, device_memory=8 * GiB, batch_size=1, seq_len=1024))
    assert p.choice.strategy == "fsdp"
    assert p.accelerate_config == "accelerate_configs/fsdp.yaml"
    assert p.command.startswith("accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 4 "
                                "recipes/pretrain.py --preset gpt2-xl")
    # DDP was tried first and refused with its number
    assert any(r.startswith("DDP") and "does not fit" in r for r in p.reasons)


def test_lora_that_does_not_fit_points_to_qlora():
    s = setup(task="lora", device_memory=1 * GiB, batch_size=1, seq_len=128)
    p = plan.make_plan(shape("gpt2-xl", "lora"), s)
    assert p.choice is None and "qlora" in p.reasons[-1]
    q = plan.make_plan(shape("gpt2-xl", "qlora"),
                       setup(task="qlora", device_memory=4 * GiB, batch_size=1, seq_len=128))
    assert q.choice is not None and q.command.startswith("python recipes/qlora.py --model_name_or_path gpt2-xl")


def test_cli_json_parses_and_has_the_table(capsys):
    assert plan_command.main(["--model", "gpt2", "--task", "pretrain", "--device", "cuda", "--num_devices", "2",
                      "--device_memory", "24GB", "--batch_size", "4", "--seq_len", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [s["strategy"] for s in out["strategies"]]
    assert names == ["single", "ddp", "fsdp", "fsdp_offload"]
    for s in out["strategies"]:
        c = s["components_bytes"]
        assert set(c) >= {"parameters", "gradients", "optimizer", "activations", "quantization", "overhead"}
        assert sum(c.values()) == pytest.approx(s["total_bytes"], abs=8)
    assert out["recommendation"]["command"].startswith("accelerate launch")
    assert out["recommendation"]["throughput"]["label"] == "estimate"


def test_cli_text_on_cpu_plans_per_process(capsys):
    assert plan_command.main(["--model", "gpt2-nano", "--device", "cpu", "--device_memory", "4GB",
                      "--no_flops_benchmark"]) == 0
    out = capsys.readouterr().out
    assert "total (peak)" in out and "python recipes/pretrain.py --preset gpt2-nano" in out


def test_plot_writes_png(tmp_path):
    path = tmp_path / "plan.png"
    assert plan_command.main(["--model", "gpt2-medium", "--device", "cuda", "--num_devices", "4",
                              "--device_memory", "16GB", "--plot", str(path), "--json"]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "./no/such/folder"], "neither a preset"),
    (["--device", "cuda", "--num_devices", "2", "--device_memory", "lots"], "cannot read memory size"),
    (["--device", "cpu", "--batch_size", "0"], "--batch_size 0 is out of range: it must be at least 1"),
    (["--device", "cpu", "--lora_dropout", "-1"], "--lora_dropout -1 is out of range"),
    (["--model", "gpt2-nano", "--device", "cpu", "--seq_len", "4096"], "longer than the model's n_positions"),
    (["--task", "lora", "--lora_targets", "q_proj", "--device", "cpu"], "unknown --lora_targets"),
    (["--device", "cuda", "--gpu", "Z80"], "unknown GPU"),
    (["--device", "cuda", "--gpu", "T4", "--task", "lora", "--strategy", "fsdp"], "--strategy fsdp does not apply"),
])
def test_bad_input_is_one_line_error(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        plan_command.main(argv + ["--no_flops_benchmark"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err


@pytest.mark.slow
def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "toolkit.plan", "--model", "gpt2-mini", "--device", "cuda", "--gpu",
                        "T4", "--task", "lora", "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)["recommendation"]
    assert rec["strategy"] == "single" and rec["fits"]


@pytest.mark.slow
def test_check_plan_predicts_a_configuration_no_calibration_used(tmp_path, capsys):
    """Two real pretrain.py runs (2 steps each, the second measured): gpt2-nano measures this machine's runtime
    term, then gpt2-mini at 16 x 128 (a shape and batch no calibration row uses; tensors are half its peak) is
    predicted within 1% with it, and within 5% with the shipped constants, as docs/training_strategies.md claims.
    The same for qlora.py (4-bit base, activation checkpointing, the model's own loss head) on Hub-like gpt2-nano and
    gpt2-mini bases (the latter at 16 x 64), within 2% and 5%.

    With a CUDA build of torch (PyPI's default on Linux; CI installs the CPU build) the shipped constants add that
    build's measured extra, its CUDA libraries' pages as mapped with a warm page cache: with a colder one up to
    ~180 MiB fewer are resident, so there the shipped constants may predict up to 18% high at these sizes, and
    at most 2.9% low (docs/training_strategies.md)."""
    import torch

    shipped_low, shipped_high = (0.971, 1.18) if torch.version.cuda else (0.95, 1.05)
    out = tmp_path / "rows.json"
    # main() here; each configuration runs in a process of its own, whose memory it measures
    code = _check_plan_module().main(["--quick", "--doc", "", "--work_dir", str(tmp_path), "--json", str(out),
                                      "--tolerance", f"{shipped_high - 1:.2f}"])
    assert code == 0, capsys.readouterr()  # 0: every check within --tolerance
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    check = rows["quick-mini-1p"]
    assert rows["quick-nano-1p"]["calibration"] and not check["calibration"]
    assert check["measured"][0] > 800 * MiB  # a real process: the runtime alone is ~0.6 GiB
    assert check["ratio_recalibrated"][0] == pytest.approx(1, abs=0.01), check
    assert shipped_low <= check["ratio"][0] <= shipped_high, check
    qlora = rows["quick-mini-qlora-1p"]
    assert rows["quick-nano-qlora-1p"]["calibration"] and not qlora["calibration"] and qlora["ckpt"]
    assert qlora["ratio_recalibrated"][0] == pytest.approx(1, abs=0.02), qlora
    assert shipped_low <= qlora["ratio"][0] <= shipped_high, qlora


def _check_plan_module():
    spec = importlib.util.spec_from_file_location("check_plan", REPO / "benchmarks" / "check_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved_run(tmp_path, runtime_mib: dict[str, float], check_error: float = 0.0, check_runtime: float | None = None,
               **meta_extra):
    """A --json file as check_plan writes it: the four calibration rows measuring the given runtime terms, and one
    check row (gpt2-mini, 16 x 256) measured check_error above its prediction with the pretrain runtime term (or
    check_runtime)."""
    def row(name, task, preset, batch, seq, runtime, procs=1, calibration=True, error=0.0):
        launch = "ddp" if procs > 1 else "single"
        config = {"model_type": "gpt2", **PRESETS[preset], "vocab_size": 4096, "activation_function":
                  "gelu_pytorch_tanh", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        s = plan.Setup(task=task, device="cpu", num_devices=procs, device_memory=24 * GiB, batch_size=batch,
                       seq_len=seq, precision="fp32")
        est = plan.estimate(plan.shape_from_config(config, name), s, launch)
        tensors = est.total - est.components["overhead"]
        return {"name": name, "calibration": calibration, "task": task, "procs": procs, "launch": launch,
                "batch": batch, "seq": seq, "ckpt": False, "attn": "sdpa", "config": config,
                "measured": [(tensors + runtime * MiB) * (1 + error)] * procs, "cuda_measured": [],
                "tokens_per_s": None, "wall_s": 1.0, "command": "python ..."}

    rt = runtime_mib
    rows = [row("nano-1p", "pretrain", "gpt2-nano", 8, 128, rt["pretrain"]),
            row("nano-ddp", "pretrain", "gpt2-nano", 8, 128, rt["pretrain"] + rt["distributed"], procs=2),
            row("nano-lora-1p", "lora", "gpt2-nano", 8, 128, rt["lora"]),
            row("nano-qlora-1p", "qlora", "gpt2-nano", 8, 128, rt["qlora"]),
            row("mini-1p", "pretrain", "gpt2-mini", 16, 256, check_runtime or rt["pretrain"], calibration=False,
                error=check_error)]
    meta = {"date": "2026-01-02", "machine": "test machine", "ram": 24.0 * GiB, "peak_flops": 1e11,
            "default_malloc": False, "command": "python benchmarks/check_plan.py", "loadavg": 0.5, **meta_extra}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def test_check_plan_exit_code_says_whether_the_checks_are_within_tolerance(tmp_path, capsys):
    check_plan = _check_plan_module()
    runtime = {"pretrain": 580, "distributed": 0, "lora": 610, "qlora": 610}
    for sub in ("off", "drift"):
        (tmp_path / sub).mkdir()
    close, off = _saved_run(tmp_path, runtime), _saved_run(tmp_path / "off", runtime, check_error=0.10)
    assert check_plan.main(["--replan", str(close), "--doc", "", "--tolerance", "0.02"]) == 0
    assert check_plan.main(["--replan", str(off), "--doc", "", "--tolerance", "0.05"]) == 1  # 10% off
    assert check_plan.main(["--replan", str(off), "--doc", "", "--tolerance", "0.15"]) == 0
    # right with the shipped runtime term (570 MiB) but 130 MiB off with the one this run's nano row measured
    drift = _saved_run(tmp_path / "drift", {**runtime, "pretrain": 700}, check_runtime=570)
    assert check_plan.main(["--replan", str(drift), "--doc", "", "--tolerance", "0.05"]) == 1
    # refusing a refit that has no calibration rows happens before any run starts
    assert check_plan.main(["--quick", "--write-calibration", str(tmp_path / "c.json"), "--doc", ""]) == 2
    assert "needs the calibration rows" in capsys.readouterr().err


def test_check_plan_writes_the_calibration_it_measured(tmp_path):
    check_plan = _check_plan_module()
    target = tmp_path / "calibration.json"
    target.write_text(calibration.CALIBRATION_FILE.read_text())
    run = _saved_run(tmp_path, {"pretrain": 601, "distributed": 12, "lora": 640, "qlora": 652})
    assert check_plan.main(["--replan", str(run), "--doc", "", "--write-calibration", str(target)]) == 0
    data = calibration.read(target)
    section = data["sections"]["cpu_runtime"]
    # rounded to 5 MiB; pretrain.py's runs ("full") share the pretrain row's term
    assert section["values"] == {"overhead_mib": {"pretrain": 600, "full": 600, "lora": 640, "qlora": 650},
                                 "distributed_overhead_mib": 10}
    assert section["measured"] == {"date": "2026-01-02", "machine": "test machine",
                                   "command": "python benchmarks/check_plan.py"}
    assert calibration.constants(data)["CPU_OVERHEAD"]["qlora"] == 650 * MiB
    # the GPU section is left for a GPU check, which refits it through the same function
    assert data["sections"]["gpu"] == calibration.read()["sections"]["gpu"]
    calibration.update_section("gpu", {"context_gib": 0.75}, date="2026-01-03", machine="1 x H200",
                               command="python kit.py", path=target)
    gpu = calibration.read(target)["sections"]["gpu"]
    assert gpu["status"] == "measured" and gpu["measured"]["machine"] == "1 x H200"
    assert calibration.constants(calibration.read(target))["GPU_CONTEXT"] == 0.75 * GiB
    with pytest.raises(KeyError, match="context_gb"):
        calibration.update_section("gpu", {"context_gb": 1}, date="", machine="", command="", path=target)


def test_a_cuda_build_of_torch_adds_its_measured_extra_to_the_cpu_runtime_term(tmp_path):
    """PyPI's default torch on Linux is a CUDA build; on a CPU its libraries make every training process larger (1,080
    vs 570 MiB at gpt2-nano, measured). The planner adds the measured extra on CPU only, and check_plan run under such
    a build refits that extra, leaving the CPU build's term alone."""
    shape = plan.load_shape("gpt2", "pretrain")
    shipped_extra_mib = json.loads(calibration.CALIBRATION_FILE.read_text())["sections"]["cpu_runtime_cuda_build"][
        "values"]["extra_mib"]
    for task in plan.TASKS:
        for device in ("cpu", "cuda"):
            plain, cuda_build = (
                plan.estimate(shape, plan.Setup(task=task, device=device, batch_size=4, seq_len=256, precision="fp32",
                                                torch_cuda_build=flag), "single")
                for flag in (False, True))
            # the measured extra as the shipped calibration file records it
            extra = shipped_extra_mib[task] * MiB if device == "cpu" else 0
            assert cuda_build.total - plain.total == extra, (task, device)
    assert all(v > 0 for v in shipped_extra_mib.values())  # measured, not the placeholder

    check_plan = _check_plan_module()
    target = tmp_path / "calibration.json"
    target.write_text(calibration.CALIBRATION_FILE.read_text())
    shipped = calibration.read(target)["sections"]["cpu_runtime"]
    cpu = shipped["values"]["overhead_mib"]
    runtime = {"pretrain": cpu["pretrain"] + 512, "distributed": 0, "lora": cpu["lora"] + 498,
               "qlora": cpu["qlora"] + 531}
    run = _saved_run(tmp_path, runtime, torch_cuda_build=True)
    assert check_plan.main(["--replan", str(run), "--doc", "", "--write-calibration", str(target)]) == 0
    data = calibration.read(target)
    assert data["sections"]["cpu_runtime"] == shipped  # measured with a CPU build: untouched
    section = data["sections"]["cpu_runtime_cuda_build"]
    assert section["values"]["extra_mib"] == {"pretrain": 510, "full": 510, "lora": 500, "qlora": 530}  # 5 MiB steps
    assert section["status"] == "measured" and section["measured"]["machine"] == "test machine"


def test_calibration_ships_with_the_package_and_says_where_it_came_from():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    patterns = cfg["options.package_data"]["toolkit.plan"].split()
    data_files = [p.name for p in (REPO / "toolkit" / "plan").iterdir() if p.is_file() and p.suffix != ".py"]
    assert data_files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in data_files), data_files
    sections = calibration.read()["sections"]
    for name, section in sections.items():
        if section["status"] == "measured":
            assert all(section["measured"][k] for k in ("date", "machine", "command")), name
        else:  # an assumption, or a GPU value not measured yet: the notes say what it rests on
            assert section["status"] in ("assumption", "not yet measured on a GPU") and section["notes"], name
    assert plan.CPU_OVERHEAD == calibration.constants(calibration.read())["CPU_OVERHEAD"]


def test_lora_target_presets_match_the_recipe():
    from toolkit.lora import TARGET_PRESETS, resolve_target_modules

    assert set(plan.LORA_TARGET_PRESETS) == set(TARGET_PRESETS)
    for name in TARGET_PRESETS:
        kinds = plan.resolve_lora_targets(name)
        expanded = resolve_target_modules([name])
        # every module kind the planner counts is one peft would match, and vice versa
        assert set(kinds) == {m for m in plan.LORA_MODULES if any(m == t or m.endswith("." + t) for t in expanded)}


@pytest.mark.parametrize("task,activation,attn,dropout,lora_dropout", [
    ("pretrain", "gelu_new", "sdpa", 0.0, 0.0),
    ("pretrain", "gelu_pytorch_tanh", "eager", 0.0, 0.0),
    ("full", "gelu_new", "sdpa", 0.1, 0.0),  # a Hub checkpoint's dropout: masks, and sdpa's math fallback on CPU
    ("lora", "gelu_new", "sdpa", 0.1, 0.05),  # frozen Conv1Ds keep nothing; LoRA branches and lora_dropout do
    ("lora", "gelu_new", "sdpa", 0.0, 0.0),  # the recipes' default: no LoRA dropout, no dropped copies
])
def test_activation_formula_matches_what_autograd_saves(task, activation, attn, dropout, lora_dropout):
    """The per-block formula is the byte count of the tensors autograd keeps for backward (tiny GPT-2, fp32 CPU)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    L, d, a, V, b, T = 2, 64, 2, 512, 4, 64
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=L, n_embd=d, n_head=a, vocab_size=V, n_positions=T,
                                       activation_function=activation, resid_pdrop=dropout, embd_pdrop=dropout,
                                       attn_pdrop=dropout, attn_implementation=attn))
    if task == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout,
                                                 target_modules=["c_attn", "c_proj", "c_fc"],
                                                 fan_in_fan_out=True, task_type="CAUSAL_LM"))
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, V, (b, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)

    sh = plan.Shape(n_layer=L, n_embd=d, n_head=a, vocab_size=V, n_positions=T, activation_function=activation,
                    resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    s = setup(task=task, device="cpu", precision="fp32", attn=attn, batch_size=b, seq_len=T, lora_dropout=lora_dropout)
    terms = plan.activation_terms(sh, s, b, False)
    # the loss head as planned (the LoRA recipes use the model's own loss too): ln_f input, lm_head input (saved for a
    # trained head only), the log-softmax output
    u = b * T * d
    head = terms["head_inputs"] + terms["logits"]
    assert head == 4 * u + (4 * u if task != "lora" else 0) + 4 * b * T * V
    planned, kept = terms["layers"] + head, sum(saved.values())
    if lora_dropout:  # with LoRA dropout the formula is an upper bound, as docs/training_strategies.md says
        assert kept <= planned <= 1.05 * kept, (planned, kept)
    else:  # to the byte but for the few small tensors outside the blocks (ids, labels, norm statistics): < 8 KiB
        assert 0 <= kept - planned < 8 * 1024, (planned, kept)


def test_cpu_commands_say_when_the_recipe_default_checkpointing_is_not_wanted():
    # qlora.py checkpoints activations by default on CPU too; lora.py does not: an unneeded flag is left out
    big = {"device": "cpu", "precision": "fp32", "device_memory": 64 * GiB, "batch_size": 2, "seq_len": 128}
    q = plan.make_plan(shape("gpt2", "qlora"), setup(task="qlora", **big))
    assert not q.choice.gradient_checkpointing and "--gradient_checkpointing false" in q.command
    lo = plan.make_plan(shape("gpt2", "lora"), setup(task="lora", **big))
    assert not lo.choice.gradient_checkpointing and "--gradient_checkpointing" not in lo.command


def test_the_command_for_a_shape_keeps_its_shape_flags_and_parses_to_the_planned_model(tmp_path):
    """toolkit plan --n_layer 48 --n_head 16 --n_embd 1600 plans GPT-2 1.5B; the command it prints builds that model
    (recipes/pretrain.py's parser), and on CPU ranks it needs no --use_cpu (the recipes set it)."""
    from test_args import parse

    shape = plan.load_shape("gpt2", "pretrain", {"n_layer": 48, "n_head": 16, "n_embd": 1600})
    s = plan.Setup(task="pretrain", device="cpu", num_devices=2, device_memory=1024 * plan.GiB, batch_size=1,
                   seq_len=256)
    p = plan.make_plan(shape, s)
    argv = p.command.split("recipes/pretrain.py ")[1].split()
    assert "--use_cpu" not in argv and p.accelerate_config.endswith("_cpu.yaml")
    model, data, _ = parse("pretrain", [*argv, "--output_dir", str(tmp_path)])
    assert (model.n_layer, model.n_head, model.n_embd, model.preset) == (48, 16, 1600, "gpt2")
    assert data.block_size == 256 and model.tokenizer_name == "gpt2"
