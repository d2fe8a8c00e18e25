"""Local stand-ins for running SambaNova's modelzoo apps against sambaflow-open (nothing is downloaded).

    python examples/modelzoo/make_assets.py OUTDIR [--max-seq-length 64] [--train N] [--modelzoo PATH]

writes, under OUTDIR (absolute paths: Hydra changes the working folder):

    llama/            a tiny Llama checkpoint: config.json, seeded random weights, and a byte-level BPE
                      tokenizer trained locally on the GPT-2 tutorial's synthetic sentiment task
                      (examples/gpt2_assets.py)
    dataset/          that task tokenized in the generative_data_prep layout the modelzoo's
                      examples/nlp/training/utils/dataset.py reads: train_1_of_1.hdf5 and dev_1_of_1.hdf5
                      ('input_ids', 'token_type_ids', int32 [rows, max_seq_length]) and metadata.yaml
    trained_rdu/, trained_cpu/, trained_dp/
                      the training apps' output folders, holding the tokenizer already, so that the
                      Hugging Face checkpoint the apps save there is one the generation apps can load

then prints the commands: the modelzoo's eager cpu_train_llm.py, rdu_train_llm.py compile and run,
rdu_train_llm_dp.py under torchrun (and mpirun when present), and generation from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import gpt2_assets  # noqa: E402  (examples/gpt2_assets.py: the task, its tokenizer and HDF5 writer)

LLAMA_CONFIG = HERE.parent / "llama" / "tiny_llama_config.json"


def llama_config(max_seq_length: int) -> dict:
    """The tiny Llama (2 layers, hidden 128, GQA 4/2) with the tokenizer's vocabulary and ids."""
    config = json.loads(LLAMA_CONFIG.read_text())
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max_seq_length)
    config["vocab_size"] = 512  # >= the tokenizer's 474 tokens; <|endoftext|> is 473
    config["bos_token_id"] = config["eos_token_id"] = config["pad_token_id"] = gpt2_assets.TOKENIZER_VOCAB - 1
    return config


def make_model_folder(folder: Path, max_seq_length: int, seed: int = 0) -> Path:
    """A 'pretrained' checkpoint: config.json, seeded random weights (model.safetensors) and the
    tokenizer (tokenizer_config.json names its class, so AutoTokenizer loads it). The apps draw
    fresh random weights from `checkpoint.config_name` in every process; starting every run from
    `checkpoint.model_name_or_path` of this folder makes their losses comparable."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    gpt2_assets.make_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(llama_config(max_seq_length), indent=2) + "\n")
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig.from_json_file(str(folder / "config.json"))).save_pretrained(str(folder))
    return folder


def same_length_examples(tokenizer, n: int, seed: int) -> list[dict[str, str]]:
    """`n` task examples that all tokenize to the same length (the most common one).

    Every row then trains on as many tokens, so the modelzoo's per-replica loss scaling (each
    data-parallel replica normalises over its own rows) gives the same step as one process
    normalising over the whole batch: the data-parallel run can be checked against it exactly."""
    from collections import Counter

    candidates = gpt2_assets.sentiment_examples(n * 16, seed)
    length = [
        len(tokenizer.encode(e["prompt"] + e["completion"], add_special_tokens=False)) for e in candidates
    ]
    common = Counter(length).most_common(1)[0][0]
    chosen = [e for e, k in zip(candidates, length) if k == common][:n]
    if len(chosen) < n:
        raise RuntimeError(
            f"only {len(chosen)} examples of {common} tokens among {len(candidates)}; ask for fewer"
        )
    return chosen


def make_dataset(folder: Path, tokenizer_folder: Path, max_seq_length: int, n_train: int, n_dev: int) -> Path:
    """HDF5 splits and the metadata.yaml generative_data_prep writes (the app reads max_seq_length)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    for split, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        rows = same_length_examples(tokenizer, n, seed)
        gpt2_assets.write_hdf5_split(folder, tokenizer, rows, max_seq_length, split)
    (folder / "metadata.yaml").write_text(
        f"max_seq_length: {max_seq_length}\nnumber_of_training_files: 1\nnumber_of_dev_files: 1\n"
        f"number_of_test_files: 0\nvocab_size: {llama_config(max_seq_length)['vocab_size']}\n"
        "tokenizer_model_type: gpt2 (built locally by examples/modelzoo/make_assets.py)\n"
    )
    return folder


def write_assets(out: Path, max_seq_length: int = 64, n_train: int = 256, n_dev: int = 32) -> Path:
    out = out.resolve()
    model = make_model_folder(out / "llama", max_seq_length)
    make_dataset(out / "dataset", model, max_seq_length, n_train, n_dev)
    for name in ("trained_rdu", "trained_cpu", "trained_dp"):
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        for f in model.iterdir():
            if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                shutil.copyfile(f, target / f.name)
    return out


def commands(
    out: Path, modelzoo: str, max_seq_length: int, batch_size: int = 4, steps: int = 8, lr: float = 1e-3
) -> str:
    """The modelzoo's commands pointed at `out` (`modelzoo`: the root of a copy of sambanova/modelzoo)."""
    train = f"{modelzoo}/examples/nlp/training"
    gen = f"{modelzoo}/examples/nlp/text_generation"
    shape = f"model.max_seq_length={max_seq_length} training.batch_size={batch_size}"
    half = f"model.max_seq_length={max_seq_length} training.batch_size={batch_size // 2}"
    config = f"checkpoint.config_name={out}/llama/config.json"  # compile: no weights are read
    weights = f"checkpoint.model_name_or_path={out}/llama"  # runs: the same starting weights
    data = f"training.dataset={out}/dataset +training.end_early_at_step={steps} training.learning_rate={lr}"
    pef = f"{out}/pef/rdu_train_llm/rdu_train_llm.pef"
    dp_pef = f"{out}/pef_dp/rdu_train_llm/rdu_train_llm.pef"
    lines = [
        "export PYTHONPATH=" + modelzoo + " HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1",
        "# eager reference (the modelzoo's own CPU app)",
        f"python {train}/cpu_train_llm.py {weights} {shape} {data} training.output_dir={out}/trained_cpu",
        "# compile, then run, with sambaflow-open",
        f"python {train}/rdu_train_llm.py command=compile {config} {shape} samba_compile.arch=sn30"
        f" samba_compile.output_folder={out}/pef",
        f"python {train}/rdu_train_llm.py command=run {weights} {shape} {data} samba_run.pef={pef}"
        f" training.output_dir={out}/trained_rdu",
        "# data parallel: 2 processes, each half the batch (the global batch equals the runs above)",
        f"python {train}/rdu_train_llm_dp.py command=compile {config} {half} samba_compile.arch=sn30"
        f" samba_compile.output_folder={out}/pef_dp",
        f"torchrun --nproc_per_node 2 {train}/rdu_train_llm_dp.py command=run {config} {half} {data}"
        f" samba_run.pef={dp_pef} training.output_dir={out}/trained_dp",
        "# where mpirun exists (MASTER_ADDR/MASTER_PORT tell the replicas where to meet):",
        f"mpirun -np 2 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 python {train}/rdu_train_llm_dp.py"
        f" command=run {config} {half} {data} samba_run.pef={dp_pef} training.output_dir={out}/trained_dp",
        "# generation from the checkpoint the run saved (the generation apps)",
        f"python {gen}/cpu_generate_text.py checkpoint.model_name_or_path={out}/trained_rdu"
        f" model.max_seq_length={max_seq_length} 'generation.prompts=[\"the movie was\"]'",
        f"python {gen}/rdu_generate_text.py command=compile checkpoint.model_name_or_path={out}/trained_rdu"
        f" model.max_seq_length={max_seq_length} generation.batch_size=1 samba_compile.arch=sn30"
        f" samba_compile.output_folder={out}/pef_gen samba_compile.pef_name=gen",
        f"python {gen}/rdu_generate_text.py command=run checkpoint.model_name_or_path={out}/trained_rdu"
        f" model.max_seq_length={max_seq_length} generation.batch_size=1"
        f" samba_run.pef={out}/pef_gen/gen/gen.pef"
        " 'generation.prompts=[\"the movie was\"]'",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--train", type=int, default=256, help="training rows")
    parser.add_argument("--dev", type=int, default=32, help="dev rows")
    parser.add_argument("--modelzoo", default="<modelzoo>", help="root of a sambanova/modelzoo copy")
    args = parser.parse_args(argv)
    out = write_assets(Path(args.outdir), args.max_seq_length, args.train, args.dev)
    modelzoo = str(Path(args.modelzoo).resolve()) if args.modelzoo != "<modelzoo>" else args.modelzoo
    print(f"wrote {out}\n\n{commands(out, modelzoo, args.max_seq_length)}")


if __name__ == "__main__":
    main()
