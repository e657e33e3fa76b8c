"""Pushing to the Hub end to end: the real huggingface_hub client against tests/hub_server.py on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT when it is imported, so every push / download runs in a fresh
process pointed at the test server, with a fake token that must reach the server and never the output.
"""

from __future__ import annotations

import json
import sys
import tempfile

import pytest
import torch
from conftest import run_script
from hub_server import HubServer

TOKEN = "hf_TestSecretToken0123456789"


def hub_env(hub: HubServer, tmp_path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost"}


def _tiny_adapter(tiny_model_dir, folder):
    """A LoRA adapter with non-trivial weights, saved as recipes/lora.py saves one."""
    from peft import get_peft_model

    from toolkit import lora, model_loading
    from toolkit.args.finetune import LoraArguments

    base = model_loading.load_model(str(tiny_model_dir))
    model = get_peft_model(base, lora.build_lora_config(LoraArguments(lora_r=4), base, quantized=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(folder)


def _logits(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


IDS = torch.arange(20).reshape(1, 20)


@pytest.mark.slow
def test_push_then_download_gives_the_same_logits(tmp_path, tiny_model_dir, small_text_file):
    """One fresh process (HF_ENDPOINT -> the test server, HF_TOKEN set): the lora recipe's command line with
    --config + overrides + --push_to_hub; `toolkit push` of another adapter into a private repo, and of a folder
    holding its base (refused before upload); then both adapters downloaded with PeftModel.from_pretrained from that
    endpoint."""
    out = tmp_path / "run"
    recipe_argv = ["--config", "recipes/configs/lora_gpt2.yaml",
                   "--model_name_or_path", str(tiny_model_dir), "--train_file", str(small_text_file),
                   "--output_dir", str(out),
                   "--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                   "--max_length", "32", "--max_eval_samples", "4", "--lora_r", "2", "--sample_max_new_tokens", "4",
                   "--push_to_hub", "--hub_model_id", "someone/run-lora",
                   "--base_model_hub_id", "openai-community/gpt2"]
    adapter = tmp_path / "adapter"
    _tiny_adapter(tiny_model_dir, adapter)
    # a card as transformers/peft write it for a local base: the Hub rejects this base_model (transformers#33922)
    (adapter / "README.md").write_text(f"---\nbase_model: {tiny_model_dir}\nlibrary_name: peft\n---\n# tiny adapter\n")
    (adapter / "training_args.bin").write_bytes(b"pickle: never uploaded")
    script = f"""
import runpy, sys, torch
from toolkit import errors
errors.exit_now = lambda code=0: None  # the script goes on after the recipe (its os._exit would end it here)
sys.argv = ["recipes/lora.py", *{recipe_argv!r}]
runpy.run_path("recipes/lora.py", run_name="__main__")
from toolkit.cli import main
assert main(["push", {str(adapter)!r}, "someone/tiny-lora", "--private"]) == 0
import shutil
shutil.copytree({str(adapter)!r}, {str(tmp_path / "bad")!r})
shutil.copy({str(tiny_model_dir / "model.safetensors")!r}, {str(tmp_path / "bad")!r})
try:
    main(["push", {str(tmp_path / "bad")!r}, "someone/bad-lora"])
    raise AssertionError("pushed an adapter folder holding its base")
except SystemExit as exc:
    assert exc.code == 2
from peft import PeftModel
from transformers import AutoModelForCausalLM
for repo in ("someone/run-lora", "someone/tiny-lora"):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}), repo)
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.arange(20).reshape(1, 20)).logits,
                   {str(tmp_path)!r} + "/" + repo.split("/")[1] + ".pt")
"""
    with HubServer() as hub:
        result = run_script(["-c", script], env=hub_env(hub, tmp_path), timeout=420)
        assert result.returncode == 0, result.stderr[-3000:]
        assert TOKEN not in result.stdout + result.stderr
        assert f"{hub.url}/someone/run-lora" in result.stdout and "removed base_model" in result.stdout
        # both adapters were checked before upload; the folder holding the base was refused and never sent
        assert f"checked {out}: reloaded on its base, outputs match the trained model" in result.stdout
        assert f"checked {adapter}: " in result.stdout and "tensors reload on their base" in result.stdout
        assert "error: '" in result.stderr and "holds base model weights (model.safetensors)" in result.stderr
        assert "someone/bad-lora" not in hub.repos

        # the recipe pushed its finished folder: adapter, tokenizer, card, metrics
        run = hub.repos["someone/run-lora"]
        assert not run.private
        for name in ("adapter_model.safetensors", "tokenizer.json", "README.md", "all_results.json"):
            assert run.files[name] == (out / name).read_bytes(), name
        # adapter_config.json: the pushed copy names the Hub base, the local one keeps the folder it was trained on
        pushed_config = json.loads(run.files["adapter_config.json"])
        local_config = json.loads((out / "adapter_config.json").read_text())
        assert pushed_config.pop("base_model_name_or_path") == "openai-community/gpt2"
        assert local_config.pop("base_model_name_or_path") == str(tiny_model_dir)
        assert pushed_config == local_config
        card = run.files["README.md"].decode()
        assert "base_model: openai-community/gpt2" in card and "python recipes/lora.py --config" in card
        # toolkit push: private repo, pickles left out, the invalid base_model dropped so the Hub accepts the card
        tiny = hub.repos["someone/tiny-lora"]
        assert tiny.private and "training_args.bin" not in tiny.files
        assert tiny.files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
        assert b"base_model" not in tiny.files["README.md"]
        # the token went with every write, and the private repo was served only with it
        writes = [r for r in hub.requests if r["method"] == "POST"]
        assert writes and all(r["authorization"] == f"Bearer {TOKEN}" for r in writes)
    for repo, local in (("run-lora", out), ("tiny-lora", adapter)):
        downloaded = torch.load(tmp_path / f"{repo}.pt", weights_only=True)
        torch.testing.assert_close(downloaded, _logits(str(tiny_model_dir), str(local)), rtol=0, atol=1e-6)
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 2


def test_model_card_command_never_contains_a_token():
    from toolkit.model_card import card_base_model, reproduce_command

    cmd = reproduce_command("recipes/lora.py", ["--hub_token", TOKEN, "--lr", "1", f"--hub_token={TOKEN}",
                                                "--output_dir", "a b"])
    assert TOKEN not in cmd
    assert cmd == "python recipes/lora.py --hub_token '<redacted>' --lr 1 '--hub_token=<redacted>' --output_dir 'a b'"
    assert (card_base_model("gpt2") == "gpt2" and card_base_model("/tmp/base") is None
            and card_base_model("./x") is None)
    assert card_base_model("/tmp/base", "openai-community/gpt2") == "openai-community/gpt2"


def test_push_refuses_bad_input_before_contacting_the_hub(tmp_path, capsys):
    from toolkit.commands import push

    def err(argv):
        with pytest.raises(SystemExit) as exc:
            push.main(argv)
        assert exc.value.code == 2
        return capsys.readouterr().err.strip()

    assert "is not a folder with files" in err([str(tmp_path / "nothing"), "someone/x"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert "not a Hub repo id" in err([str(tmp_path / "a"), "some one/x!"])
    assert "no namespace" in err([str(tmp_path / "a"), "justaname"])


def _adapter_error(folder, **kwargs) -> str:
    from toolkit.errors import UserError
    from toolkit.hub import check_adapter_folder

    with pytest.raises(UserError) as exc:
        check_adapter_folder(str(folder), **kwargs)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_an_adapter_is_checked_before_it_is_pushed(tmp_path, tiny_model_dir):
    """The checks `toolkit push` and --push_to_hub run on an adapter folder before any upload: it reloads on its base
    with the values saved (and the outputs of the model it was saved from); base weights, extra bulk, a partial save
    or a folder that does not match the trained model are refused with one line."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from toolkit import model_loading
    from toolkit.hub import check_adapter_folder

    good = tmp_path / "good"
    _tiny_adapter(tiny_model_dir, good)
    assert "reload on their base" in check_adapter_folder(str(good))
    trained = PeftModel.from_pretrained(model_loading.load_model(str(tiny_model_dir)), good, is_trainable=True)
    trained.train()
    before = _model_logits(trained)
    note = check_adapter_folder(str(good), trained_model=trained)
    assert "outputs match the trained model" in note
    # the trained model is left as it was: same outputs, its adapter active, in training mode
    assert trained.active_adapter == "default" and list(trained.peft_config) == ["default"] and trained.training
    assert torch.equal(_model_logits(trained), before)

    def variant(name):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    # the full base saved beside the adapter (transformers#28297)
    folder = variant("with-base")
    shutil.copy(tiny_model_dir / "model.safetensors", folder / "model.safetensors")
    assert "holds base model weights (model.safetensors) beside its adapter" in _adapter_error(folder)
    # base tensors inside adapter_model.safetensors
    folder = variant("base-inside")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.transformer.wte.weight"] = load_file(tiny_model_dir / "model.safetensors")[
        "transformer.wte.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")
    assert "holds 1 tensor(s) that are not part of the adapter" in _adapter_error(folder)
    # a folder far larger than its config implies: a stray training-state dump of 2 MiB
    folder = variant("bulky")
    (folder / "global_step8").mkdir()
    torch.save({"state": torch.zeros(1 << 19)}, folder / "global_step8" / "mp_rank_00_model_states.pt")
    err = _adapter_error(folder)
    assert "MiB of weight files, far more than the" in err and "its adapter_config.json implies (r=4" in err
    # half the tensors (one rank's shard, accelerate#4206)
    folder = variant("partial")
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(dict(list(tensors.items())[: len(tensors) // 2]), folder / "adapter_model.safetensors")
    kept = len(tensors) // 2
    assert f"lacks {len(tensors) - kept} of the adapter's {len(tensors)} tensors" in _adapter_error(folder)
    # the folder holds another adapter than the one trained: refused with the figure
    other = tmp_path / "other"
    _tiny_adapter(tiny_model_dir, other)
    tensors = load_file(other / "adapter_model.safetensors")
    save_file({k: v * 1.5 for k, v in tensors.items()}, other / "adapter_model.safetensors")
    err = _adapter_error(other, trained_model=trained)
    assert err.startswith(f"the adapter in '{other}' does not reload as trained: its outputs differ from the trained "
                          "model's by ")
    assert float(err.split(" by ")[1].split(" ")[0]) > 1e-4
    assert torch.equal(_model_logits(trained), before)
    # a config that scales the update otherwise than the one trained
    folder = variant("other-alpha")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    err = _adapter_error(folder, trained_model=trained)
    assert err.startswith(f"'{folder}' adapter_config.json does not match the trained adapter (lora_alpha ")


def test_toolkit_push_checks_an_adapter_on_the_base_given_or_not_at_all(tmp_path, tiny_model_dir, capsys):
    """`toolkit push`: --base_model_name_or_path names the base when the recorded one moved; --no_verify skips the
    check (here the suite's offline Hub is what stops it)."""
    from toolkit.commands import push

    def err(argv):
        with pytest.raises(SystemExit) as exc:
            push.main(argv)
        assert exc.value.code == 2
        return capsys.readouterr().err.strip()

    folder = tmp_path / "adapter"
    _tiny_adapter(tiny_model_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert "does not exist" in err([str(folder), "someone/x"])
    capsys.readouterr()
    # with the base named, the check passes and the push goes on to the (offline) Hub
    assert "cannot reach the Hub" in err([str(folder), "someone/x", "--base_model_name_or_path", str(tiny_model_dir)])
    (folder / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    assert "holds base model weights" in err([str(folder), "someone/x"])
    assert "cannot reach the Hub" in err([str(folder), "someone/x", "--no_verify"])


@pytest.mark.parametrize("kind", ["qlora", "lora-embeddings"])
def test_the_reload_check_passes_for_qlora_and_trained_embeddings(tmp_path, tiny_model_dir, kind):
    """The trained model's own base serves the reload (a 4-bit base stays 4-bit); peft's modules_to_save copies of the
    tied embedding and head are reloaded too."""
    from test_lora import _lora_model, _randomize_adapter

    from toolkit.hub import check_adapter_folder

    model = _lora_model(tiny_model_dir, quantized=kind == "qlora", train_embeddings=kind == "lora-embeddings")
    _randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    assert "outputs match the trained model (difference 0)" in check_adapter_folder(str(tmp_path / "adapter"),
                                                                                     trained_model=model)


def _model_logits(model):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    model.train(was_training)
    return out


def test_recipe_refuses_push_without_a_repo_id(tmp_path, tiny_model_dir, small_text_file, capsys):
    from test_lora import run_recipe

    with pytest.raises(SystemExit) as exc:
        run_recipe("lora", ["--model_name_or_path", str(tiny_model_dir), "--train_file", str(small_text_file),
                            "--output_dir", str(tmp_path / "o"), "--push_to_hub"])
    assert exc.value.code == 2
    assert "--push_to_hub needs --hub_model_id" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_push_needs_a_token_before_training(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from toolkit.errors import UserError
    from toolkit.hub import check_push_ready

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no stored login
    with pytest.raises(UserError, match="no Hub token found"):
        check_push_ready("someone/x")
    with pytest.raises(UserError, match="not a Hub repo id"):
        check_push_ready("some one/x", token=TOKEN)
    check_push_ready("someone/x", token=TOKEN)  # an explicit --hub_token is enough
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    check_push_ready("someone/x")  # so is HF_TOKEN


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_suite_cannot_reach_the_hub_or_a_stored_login():
    """conftest.py sets these before huggingface_hub is imported: offline, an empty HF_HOME, no token variables."""
    import huggingface_hub
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    assert huggingface_hub.get_token() is None
    assert constants.HF_HOME.startswith(tempfile.gettempdir())
