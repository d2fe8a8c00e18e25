"""examples/llama_app.py end to end on the inductor backend, as a user runs it: compile the training
step, train from the PEF to eager's losses and accuracy, write a Hugging Face checkpoint, compile the
prompt and token programs, and generate from that checkpoint exactly what Hugging Face `generate`
gives. Nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from test_apps_e2e import app, load_example

from sambaflow.samba import utils

from helpers import eager_grouped_adamw

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

BATCH, STEPS, SEQ = 8, 40, 48
COMMON = ["-b", str(BATCH), "--max-seq-length", str(SEQ), "--backend", "inductor"]


def eager_training(module, tokenizer) -> list[float]:
    """The app's training in plain PyTorch/transformers: same initial weights, batches and groups."""
    assets = module.assets
    utils.set_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_json_file(str(module.TINY_CONFIG)))
    model = module.LlamaLoss(lm)
    groups = [
        [p for n, p in model.named_parameters() if "norm" not in n],
        [p for n, p in model.named_parameters() if "norm" in n],
    ]
    ids, types = assets.tokenize_examples(tokenizer, assets.sentiment_examples(4000, 1), SEQ)
    generator = torch.Generator().manual_seed(0)

    def loss_of_step(_: int) -> torch.Tensor:
        rows = torch.randint(0, len(ids), (BATCH,), generator=generator)
        inputs, labels = module.labelled(ids[rows], types[rows])
        return model(inputs.long(), labels.long())[0]

    return eager_grouped_adamw(groups, (0.1, 0.0), loss_of_step, STEPS, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def hf_completions(checkpoint, prompts: list[str], new: int) -> list[str]:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    completions = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=new, do_sample=False, use_cache=True)
        completions.append(repr(tokenizer.decode(out[0, ids.input_ids.shape[1] :])))
    return completions


def test_llama_app_trains_checkpoints_and_generates_with_its_cache(tmp_path):
    module = load_example("llama_app")
    compiled = app("llama_app", "compile", *COMMON, "--pef-name", "llama", cwd=tmp_path)
    assert "wrote out/llama/llama.pef" in compiled
    train = ["--steps", str(STEPS), "--checkpoint", "ckpt", "--log-losses", "log.json"]
    ran = app("llama_app", "run", *COMMON, "-p", "out/llama/llama.pef", *train, cwd=tmp_path)
    assert "Saved checkpoint ckpt" in ran
    log = json.loads((tmp_path / "log.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    want = eager_training(module, tokenizer)
    worst = max(abs(a - b) / max(b, 1e-2) for a, b in zip(log["losses"], want))
    assert worst < 3e-2, f"losses drift from eager's by {worst:.1e}"
    assert log["accuracy"] > 0.95, log["accuracy"]

    inference = ["--inference", "-b", "2", "--max-seq-length", "64", "--prompt-length", "48"]
    inference += ["--backend", "inductor"]
    app("llama_app", "compile", *inference, "--pef-name", "gen", cwd=tmp_path)
    prompts = [e["prompt"] for e in module.assets.sentiment_examples(3, seed=7)]
    (tmp_path / "prompts.txt").write_text("".join(p.replace("\n", "\\n") + "\n" for p in prompts))
    run = [
        "-p",
        "out/gen/gen.pef",
        "--checkpoint",
        "ckpt",
        "--prompts",
        "prompts.txt",
        "--max-new-tokens",
        "3",
    ]
    generated = app("llama_app", "run", *inference, *run, cwd=tmp_path)
    lines = [
        line.removeprefix("completion: ")
        for line in generated.splitlines()
        if line.startswith("completion: ")
    ]
    assert lines == hf_completions(str(tmp_path / "ckpt"), prompts, 3)
    assert "new tokens/s" in generated.splitlines()[-1]
