"""benchmarks/vs_nanogpt.py's parts, without a nanoGPT checkout (the full comparison needs one and minutes): the
split is nanoGPT's, the windowed bits-per-byte scorer counts every character once with the right bytes, the
[phase] markers wrap what they name (and the toolkit still has every function they name), the timelines add up,
and the section it writes has both runs and no machine paths."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys

import pytest
from conftest import REPO, SHAKESPEARE, needs_shared

sys.path.insert(0, str(REPO / "benchmarks"))
harness = importlib.import_module("harness")
vs = importlib.import_module("vs_nanogpt")


def load_phase_trace():
    spec = importlib.util.spec_from_file_location("phase_trace_under_test", vs.PHASE_TRACE / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not named sitecustomize: defines the finder without installing it
    return module


def test_split_is_nanogpts_rule_by_characters_not_bytes():
    text = "ab\u00e9\u4e2d" * 25 + "xyz"  # 103 characters, 178 UTF-8 bytes
    train, val = vs.char_split(text)
    assert train + val == text
    assert len(train) == int(103 * 0.9) == 92 and len(val) == 11


@needs_shared
def test_split_of_tiny_shakespeare_has_the_counts_nanogpts_prepare_prints():
    train, val = vs.char_split(SHAKESPEARE.read_text(encoding="utf-8"))
    assert (len(train), len(val)) == (1_003_854, 111_540)  # data/shakespeare_char/prepare.py's own comment


class Bigram:
    """A model with nanoGPT's interface, model(idx, targets) -> (logits, mean loss), whose prediction depends on the
    previous character only, so its windowed score must equal the plain sum over the whole sequence."""

    def __init__(self, vocab: int, seed: int = 0):
        import torch

        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def eval(self):
        return self

    def __call__(self, idx, targets):
        import torch.nn.functional as F

        logits = self.table[idx]
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


@pytest.mark.parametrize("n, block, batch", [(1000, 64, 64), (1000, 7, 3), (65, 64, 2)])
def test_windowed_nll_scores_every_character_but_the_first_exactly_once(n, block, batch):
    import torch

    vocab = 11
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1)).numpy().astype("uint16")
    model = Bigram(vocab)
    nats, scored = vs.windowed_nll(model, ids, block, batch_size=batch)
    t = torch.from_numpy(ids.astype("int64"))
    expected = -torch.log_softmax(model.table[t[:-1]], dim=-1).gather(1, t[1:, None]).sum().item()
    assert scored == n - 1
    assert nats == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_divides_by_the_utf8_bytes_of_the_scored_characters():
    import numpy as np

    itos = {0: "a", 1: "\u00e9", 2: "\u4e2d", 3: "\n"}  # 1, 2, 3 and 1 bytes
    ids = np.array([3, 0, 1, 2, 2, 1, 0, 3, 0], dtype=np.uint16)
    model = Bigram(4)
    model.table.zero_()  # uniform: ln 4 nats for every scored character
    r = vs.char_bits_per_byte(model, ids, itos, block_size=4)
    n_bytes = 1 + 2 + 3 + 3 + 2 + 1 + 1 + 1  # ids[1:]; the first character has no context and is not scored
    assert (r["tokens"], r["bytes"]) == (8, n_bytes)
    assert r["bits_per_byte"] == pytest.approx(8 * math.log(4) / (math.log(2) * n_bytes))
    assert r["loss"] == pytest.approx(math.log(4))


def test_phase_markers_wrap_functions_when_their_module_is_first_imported(tmp_path, monkeypatch, capsys):
    trace = load_phase_trace()
    source = "def work(x):\n    return x + 1\n\n\nclass T:\n    def training_step(self):\n        return 2\n"
    (tmp_path / "phase_target.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(trace, "ONCE", {"T.training_step"})
    finder = trace.install({"phase_target": ["work", "T.training_step", "gone"]})
    try:
        import phase_target
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("phase_target", None)
    assert phase_target.work(1) == 2
    assert phase_target.T().training_step() == 2 and phase_target.T().training_step() == 2
    assert capsys.readouterr().err.splitlines() == ["[phase] work start", "[phase] work end",
                                                    "[phase] T.training_step start", "[phase] T.training_step end"]


def test_every_marked_toolkit_function_still_exists():
    """The breakdown silently loses a phase when a marked function is renamed or moved; say which."""
    trace = load_phase_trace()
    missing = []
    for module_name, names in trace.PHASES.items():
        module = importlib.import_module(module_name)
        for name in names:
            owner, _, attr = name.rpartition(".")
            target = getattr(module, owner, None) if owner else module
            if not callable(getattr(target, attr, None)):
                missing.append(f"{module_name}.{name}")
    assert not missing, f"benchmarks/phase_trace marks functions that no longer exist: {missing}"


def ours_run_lines():
    """The marker and log lines of a short run of ours, at made-up arrival times (seconds)."""
    events = [(4.0, "parse start"), (4.5, "parse end"), (5.0, "training_corpus start"), (5.2, "training_corpus end"),
              (5.2, "train_bpe_tokenizer start"), (5.7, "train_bpe_tokenizer end"), (5.8, "cached_store start"),
              (6.0, "cached_store end"), (6.1, "peak_flops start"), (6.9, "peak_flops end"),
              (7.0, "PretrainTrainer.train start"), (7.3, "PretrainTrainer.training_step start"),
              (7.6, "PretrainTrainer.training_step end"), (20.0, "PretrainTrainer.evaluate start"),
              (21.0, "PretrainTrainer.evaluate end"), (21.0, "PretrainTrainer._save_checkpoint start"),
              (21.5, "PretrainTrainer._save_checkpoint end"), (40.0, "plot_loss_curve start"),
              (40.4, "plot_loss_curve end"), (40.5, "PretrainTrainer.train end"),
              (40.5, "PretrainTrainer.evaluate start"), (41.5, "PretrainTrainer.evaluate end"),
              (41.6, "export_full_model start"), (41.7, "export_full_model end"),
              (41.8, "plot_loss_curve start"), (41.9, "plot_loss_curve end"), (42.0, "load_for_inference start"),
              (42.2, "load_for_inference end"), (42.2, "continuation start"), (43.2, "continuation end")]
    lines = [(t, f"[phase] {e}") for t, e in events]
    lines.append((40.45, "{'train_runtime': '33.4', 'train_loss': '5.0', 'epoch': '4'}"))
    lines.append((43.3, "Sample: 'To be'"))
    return sorted(lines, key=lambda x: x[0])


def test_our_timeline_phases_add_up_to_the_wall_time():
    run = harness.Run(["python", "recipes/pretrain.py"], 0, 45.0, ours_run_lines())
    t = vs.ours_timeline(run)
    p = t["phases"]
    assert (t["first_step_start_s"], t["first_step_done_s"], t["train_runtime_s"]) == (7.3, 7.6, 33.4)
    assert p["imports and argument parsing"] == pytest.approx(4.5)
    assert p["data: read text, train the BPE, tokenize and pack"] == pytest.approx(1.0)
    assert p["evaluations during training"] == pytest.approx(1.0) and p["checkpoint saves"] == pytest.approx(0.5)
    assert p["loss-curve plot at the end of training (callback)"] == pytest.approx(0.4)
    assert p["training steps (2nd to last)"] == pytest.approx(40.5 - 7.6 - 1.9)
    assert p["final evaluation"] == pytest.approx(1.0)
    assert p["closing sample (load the saved model, generate)"] == pytest.approx(1.2)
    assert p["process exit after the last line (interpreter shut-down)"] == pytest.approx(45.0 - 43.3)
    assert sum(p.values()) == pytest.approx(45.0)
    assert t["details"]["peak_flops_probe_s"] == pytest.approx(0.8) and t["details"]["evaluations"] == 2


def test_a_run_killed_after_its_first_step_has_its_start_up_phases():
    lines = [x for x in ours_run_lines() if x[0] <= 7.6]
    t = vs.ours_timeline(harness.Run(["x"], -9, 7.7, lines))
    assert t["first_step_start_s"] == 7.3
    assert t["phases"]["Trainer.train() until the first step"] == pytest.approx(0.3)
    assert t["phases"]["training steps (2nd to last)"] is None


NANOGPT_LINES = ["tokens per iteration will be: 768", "number of parameters: 0.80M", "using fused AdamW: False",
                 "step 0: train loss 4.2000, val loss 4.2000", "iter 0: loss 4.1828, time 600.00ms, mfu -100.00%",
                 *[f"iter {i}: loss 3.0000, time 100.00ms, mfu 0.01%" for i in range(1, 5)],
                 "step 5: train loss 3.1000, val loss 3.2000", "saving checkpoint to out-shakespeare-char",
                 "iter 5: loss 3.0000, time 400.00ms, mfu 0.01%",  # its time includes the eval and the save
                 *[f"iter {i}: loss 3.0000, time 100.00ms, mfu 0.01%" for i in range(6, 10)]]


def test_nanogpt_timeline_reads_its_prints():
    lines = [(1.0 + 0.5 * i, line) for i, line in enumerate(NANOGPT_LINES)]
    run = harness.Run(["python", "train.py"], 0, 10.0, lines)
    t = vs.nanogpt_timeline(run, eval_interval=5)
    assert t["startup_s"] == 2.5 and t["first_step_done_s"] == 3.0  # after the step-0 eval; after iter 0
    assert t["loop_s"] == pytest.approx(lines[-1][0] - 2.0)
    assert t["steps"] == 10 and t["saves"] == 1 and t["step_ms_median"] == 100.0
    assert t["evals_and_saves_s"] == pytest.approx(0.3)  # iter 5 took 300 ms more than a plain step


def test_section_has_both_runs_the_verdict_and_no_machine_paths(tmp_path):
    def result(who, wall, bpb, window):
        score = {"bits_per_byte": bpb, "window": window, "tokens": 100, "bytes": 290, "checkpoint_iter": 2000,
                 "eval_s": 3.0, "shown": "toolkit eval $TMP/ours-0 --text_file $TMP/val.txt --block_size 128 --json"}
        return {"who": who, "round": 1, "wall_s": wall, "startup_s": 2.0, "train_s": wall - 10, "peak_rss_mb": 500.0,
                "score": score, "shown": f"python {who}.py", "timeline": {}, "data_cache": "cold"}

    results = [result("nanoGPT", 141.0, 2.74, 64), result("ours", 130.0, 2.41, 128)]
    body = vs.report(results, {"wall_s": 0.5}, quick=False)
    doc = tmp_path / "benchmarks.md"
    command = vs.shown_command(["--nanogpt", "/x/nanoGPT"], REPO.parent / "nanoGPT")
    harness.write_section(*vs.SECTION, body, command=command, doc=doc)
    text = doc.read_text()
    rows = harness.parse_table(text[text.index("| run |"):])
    assert [(r["run"], r["val bits/byte (whole text)"]) for r in rows] == [("nanoGPT", "2.7400"), ("ours", "2.4100")]
    assert "## 9. The main job against nanoGPT" in text and "**0.92x**" in text and "**met**" in text
    assert "--nanogpt ../nanoGPT" in text
    assert str(REPO) not in text and "/tmp/" not in text
