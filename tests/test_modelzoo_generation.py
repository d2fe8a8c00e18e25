"""SambaNova's modelzoo generation app, unchanged, against this package (issue 18).

Runs only where a copy of the modelzoo is present: set SAMBAFLOW_MODELZOO to its root (the folder
holding `sambanova_modelzoo/` and `examples/`); skips cleanly otherwise, and where its own
dependencies (hydra-core, pydantic, accelerate: `pip install -e .[modelzoo]`) are missing.

A tiny Llama checkpoint is made here (LlamaConfig + save_pretrained, and a tokenizer built
locally: nothing is downloaded). `rdu_generate_text.py command=compile` then `command=run`, each
in its own process, must print the greedy completions of the modelzoo's own eager app
`cpu_generate_text.py` and of Hugging Face `generate` on the same weights (fp32: mixedp_attn off,
fp32_ln on), for two prompts of different lengths in one batch and two compiled prompt lengths.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.environ.get("SAMBAFLOW_MODELZOO")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not ROOT or not Path(ROOT, "examples/nlp/text_generation/rdu_generate_text.py").is_file(),
        reason="SAMBAFLOW_MODELZOO does not point at a copy of SambaNova's modelzoo",
    ),
]
for needed in ("hydra", "pydantic", "accelerate"):
    pytest.importorskip(needed)

HERE = Path(__file__).resolve().parent
PROMPTS = ["the movie was good", "i think the plot felt painfully dull and the cast was bland"]
NEW_TOKENS = 12
FP32 = ["model.max_seq_length=64", "model.mixedp_attn=False", "model.fp32_ln=True"]
BATCH = ["generation.batch_size=2", "+generation.static_seq_lengths=[16,64]"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, grouped-query heads) saved as a Hugging Face folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE.parent / "examples"))
    import gpt2_assets  # the local byte-level BPE tokenizer of the GPT-2 example

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(gpt2_assets.make_tokenizer(folder / "tokenizer"))
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder / "ckpt")
    tokenizer.save_pretrained(folder / "ckpt")
    return folder / "ckpt"


def app(script: str, *overrides: str, backend: str = "reference", cwd: Path | None = None) -> str:
    """Run one of the modelzoo's apps in its own process; its output (the run must succeed)."""
    folder = Path(ROOT, "examples/nlp/text_generation")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(HERE.parent)]), SAMBAFLOW_BACKEND=backend)
    done = subprocess.run(
        [sys.executable, str(folder / script), *overrides, f"hydra.run.dir={cwd}"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def completions(stdout: str) -> list[str]:
    """The list the apps print on the line after 'Completion:'."""
    lines = stdout.splitlines()
    return ast.literal_eval(lines[lines.index("Completion:") + 1])


def hugging_face(checkpoint: Path) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    found = []
    for prompt in PROMPTS:  # one at a time: HF's own batching would want left padding
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(
            **ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
        found.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return found


@pytest.fixture(scope="module")
def expected(checkpoint, tmp_path_factory) -> list[str]:
    prompts = "generation.prompts=[" + ",".join(f'"{p}"' for p in PROMPTS) + "]"
    cwd = tmp_path_factory.mktemp("cpu_app")
    eager = completions(app("cpu_generate_text.py", f"checkpoint.model_name_or_path={checkpoint}", *FP32, *BATCH,
                            prompts, f"generation.max_new_tokens={NEW_TOKENS}", cwd=cwd))  # fmt: skip
    assert eager == hugging_face(checkpoint)
    assert all(len(text) > 0 for text in eager)
    return eager


@pytest.mark.parametrize("backend", ["reference", "inductor"])
def test_rdu_generate_text_equals_the_eager_app_and_hugging_face(checkpoint, expected, backend, tmp_path):
    common = [f"checkpoint.model_name_or_path={checkpoint}", *FP32, *BATCH]
    compiled = app("rdu_generate_text.py", "command=compile", *common, "samba_compile.arch=sn30",
                   f"samba_compile.output_folder={tmp_path}", "samba_compile.pef_name=textgen",
                   backend=backend, cwd=tmp_path / "compile")  # fmt: skip
    pef = tmp_path / "textgen" / "textgen.pef"
    assert pef.is_file(), compiled
    assert (
        "graphs ['model_nocache_16_fwd', 'model_nocache_64_fwd', 'model_cache_64_fwd', 'token_gen_init'"
        in compiled
    )
    prompts = "generation.prompts=[" + ",".join(f'"{p}"' for p in PROMPTS) + "]"
    ran = app("rdu_generate_text.py", "command=run", *common, f"samba_run.pef={pef}", prompts,
              f"generation.max_new_tokens={NEW_TOKENS}", backend=backend, cwd=tmp_path / "run")  # fmt: skip
    assert completions(ran) == expected
    assert (
        "time to first token" in ran and (tmp_path / "run" / "text_gen_telemetry" / "summary.txt").is_file()
    )


def test_the_pef_generates_on_the_device_with_its_postprocess_graphs(checkpoint, expected, tmp_path):
    """The PEF's own loop: sampling, the token written into token_gen's input, the index and mask
    advanced in place, all through regions (tests/modelzoo_device_loop.py)."""
    common = [f"checkpoint.model_name_or_path={checkpoint}", *FP32, *BATCH]
    app("rdu_generate_text.py", "command=compile", *common, "samba_compile.arch=sn30",
        f"samba_compile.output_folder={tmp_path}", "samba_compile.pef_name=loop", cwd=tmp_path / "compile")  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(HERE.parent)]), SAMBAFLOW_BACKEND="reference"
    )
    script = [
        sys.executable,
        str(HERE / "modelzoo_device_loop.py"),
        str(checkpoint),
        str(tmp_path / "loop" / "loop.pef"),
    ]
    done = subprocess.run(
        [*script, str(NEW_TOKENS), *PROMPTS], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-5000:]
    got = [ast.literal_eval(line) for line in done.stdout.splitlines() if line.startswith(("'", '"'))]
    assert got == expected
