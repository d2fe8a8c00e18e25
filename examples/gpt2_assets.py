"""Local assets for the GPT-2 examples: a synthetic sentiment task, its tokenizer, data and model.

Nothing is downloaded. The task uses the prompt form of SambaNova's `generative_nlp` tutorial
(SST-2 as prompt/completion pairs); the label is the polarity of the sentence's sentiment words.

    python examples/gpt2_assets.py OUTDIR [--max-seq-length 64] [--train N --dev M]

writes OUTDIR/model (config, weights, tokenizer), OUTDIR/config.json, OUTDIR/hdf5/{train,dev}_1_of_1.hdf5
and OUTDIR/prompts.jsonl, then prints the tutorial's commands adapted to those paths.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TINY_CONFIG = HERE / "gpt2" / "tiny_gpt2_config.json"
SMALL_LIKE_CONFIG = HERE / "gpt2" / "gpt2_small_like_config.json"

EOS = "<|endoftext|>"
# 256 bytes + 217 merges (every word of the task one token) + <|endoftext|> (the last id, as in GPT-2)
TOKENIZER_VOCAB = 474
# Token types of the tutorial's HDF5 files (generative_data_prep): the <|endoftext|> that ends an
# example is SEP, trained on but not part of the exact-match; the ones after it are PADDING.
PROMPT, COMPLETION, PADDING, SEP = 0, 1, 2, 3
PROMPT_FORM = "SENTIMENT ANALYSIS: {text} QUESTION: Is this sentence positive or negative?\n\n"
LABELS = ("negative", "positive")

# Each clause has a sentiment adverb and adjective of one polarity; subjects, verbs and openers are
# neutral filler. Two sentiment words a clause make the task learnable in a few hundred steps even
# when the loss also covers the prompt tokens (as the tutorial's does).
POSITIVE = ("good", "great", "wonderful", "brilliant", "lovely", "charming", "delightful", "superb", "fun")
NEGATIVE = ("bad", "awful", "terrible", "boring", "dull", "clumsy", "tedious", "weak", "bland")
POSITIVE_ADVERBS = ("wonderfully", "beautifully", "truly", "happily")
NEGATIVE_ADVERBS = ("painfully", "horribly", "sadly", "awfully")
SUBJECTS = (
    "the movie",
    "the film",
    "the plot",
    "the cast",
    "the script",
    "the ending",
    "the music",
    "the story",
)
VERBS = ("was", "is", "seemed", "felt", "looked", "sounded")
OPENERS = ("", "honestly, ", "overall ", "i think ", "in the end ")


def _clause(rng: random.Random, positive: bool) -> str:
    """One clause such as 'the plot felt painfully dull'."""
    adverb = rng.choice(POSITIVE_ADVERBS if positive else NEGATIVE_ADVERBS)
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {adverb} {adjective}"


def _sentence(rng: random.Random, positive: bool) -> str:
    """A sentence of one or two clauses, all of the same polarity."""
    clauses = [_clause(rng, positive) for _ in range(rng.choice((1, 2)))]
    return rng.choice(OPENERS) + " and ".join(clauses)


def sentiment_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` examples `{"prompt": ..., "completion": "positive" | "negative"}`, deterministic in `seed`."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        positive = rng.random() < 0.5
        prompt = PROMPT_FORM.format(text=_sentence(rng, positive))
        examples.append({"prompt": prompt, "completion": LABELS[positive]})
    return examples


def _tokenizer_corpus(seed: int) -> list[str]:
    """Prompts and completions as separate texts (they are tokenized separately), plus every word."""
    texts = [t for e in sentiment_examples(2000, seed) for t in (e["prompt"], e["completion"])]
    words = POSITIVE + NEGATIVE + POSITIVE_ADVERBS + NEGATIVE_ADVERBS + SUBJECTS + VERBS + OPENERS
    return texts + [" ".join(words)] * 2


def make_tokenizer(folder: str | Path, seed: int = 0) -> Path:
    """Train a GPT-2 byte-level BPE tokenizer on the task's text and save it to `folder`.

    The folder loads offline with `AutoTokenizer.from_pretrained(folder)` or
    `GPT2TokenizerFast.from_pretrained(folder)`; `<|endoftext|>` is bos, eos and unk. A config.json
    (the tiny GPT-2's) tells AutoTokenizer the model type when the folder has none.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_tokenizer_corpus(seed), vocab_size=TOKENIZER_VOCAB - 1, show_progress=False)
    vocab_file, merges_file = bpe.save_model(str(folder))
    vocab = json.loads(Path(vocab_file).read_text())
    if len(vocab) != TOKENIZER_VOCAB - 1:
        raise RuntimeError(f"BPE training gave {len(vocab)} tokens, expected {TOKENIZER_VOCAB - 1}")
    vocab[EOS] = len(vocab)
    Path(vocab_file).write_text(json.dumps(vocab, ensure_ascii=False))
    config = json.loads(TINY_CONFIG.read_text())
    tok = GPT2TokenizerFast(vocab_file, merges_file, model_max_length=config["n_positions"])
    _check_tokenizer(tok, config)
    tok.save_pretrained(str(folder))
    if not (folder / "config.json").exists():
        shutil.copyfile(TINY_CONFIG, folder / "config.json")
    return folder


def _check_tokenizer(tok, config: dict) -> None:
    """Each label must be one token and `<|endoftext|>` must be the id the config names."""
    for label in LABELS:
        if len(tok.encode(label)) != 1:
            raise RuntimeError(f"completion {label!r} is not a single token: {tok.tokenize(label)}")
    if tok.eos_token_id != config["eos_token_id"] or len(tok) > config["vocab_size"]:
        raise RuntimeError(
            f"tokenizer (eos {tok.eos_token_id}, {len(tok)} tokens) does not match {TINY_CONFIG}"
        )


def _encode_example(tokenizer, example: dict[str, str], max_seq_length: int, index: int):
    """Token ids and types of one row: prompt, completion, `<|endoftext|>` (SEP), then padding."""
    prompt = tokenizer.encode(example["prompt"], add_special_tokens=False)
    completion = tokenizer.encode(example["completion"], add_special_tokens=False)
    length = len(prompt) + len(completion) + 1
    if length > max_seq_length:
        raise ValueError(
            f"example {index} needs {length} tokens ({len(prompt)} prompt, {len(completion)} completion, "
            f"1 <|endoftext|>) but max_seq_length is {max_seq_length}: raise max_seq_length"
        )
    pad = max_seq_length - length
    ids = prompt + completion + [tokenizer.eos_token_id] * (1 + pad)
    types = [PROMPT] * len(prompt) + [COMPLETION] * len(completion) + [SEP] + [PADDING] * pad
    return ids, types


def tokenize_examples(
    tokenizer, examples: list[dict[str, str]], max_seq_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, token_type_ids)`, both int64 `[len(examples), max_seq_length]`, one example a row.

    Labels are `input_ids` shifted left by one; the exact-match accuracy compares predictions at the
    positions whose *target* has type COMPLETION.
    """
    rows = [_encode_example(tokenizer, e, max_seq_length, i) for i, e in enumerate(examples)]
    input_ids = torch.tensor([ids for ids, _ in rows], dtype=torch.long)
    token_type_ids = torch.tensor([types for _, types in rows], dtype=torch.long)
    return input_ids, token_type_ids


def write_hdf5_split(
    folder: str | Path, tokenizer, examples: list[dict[str, str]], max_seq_length: int, split: str = "train"
) -> Path:
    """Write `folder/{split}_1_of_1.hdf5` in the tutorial's format ('input_ids', 'token_type_ids')."""
    import h5py

    input_ids, token_type_ids = tokenize_examples(tokenizer, examples, max_seq_length)
    path = Path(folder) / f"{split}_1_of_1.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("input_ids", data=input_ids.numpy().astype("int32"))
        f.create_dataset("token_type_ids", data=token_type_ids.numpy().astype("int32"))
    return path


def write_jsonl(path: str | Path, examples: list[dict[str, str]]) -> Path:
    """One `{"prompt": ..., "completion": ...}` object a line (the tutorial's inference input)."""
    path = Path(path)
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def make_model_folder(folder: str | Path, seed: int = 0) -> Path:
    """A 'pretrained' tiny GPT-2 for `--model_name_or_path`: fresh weights (seeded) plus the tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config.from_json_file(TINY_CONFIG))
    model.save_pretrained(str(folder))
    make_tokenizer(folder, seed)
    return folder


def tutorial_commands(out: Path, max_seq_length: int, steps: int = 300) -> str:
    """The tutorial's compile/run commands for training and inference, pointed at `out`."""
    common = (
        f"--max_seq_length {max_seq_length} --config_name {out}/config.json --model_name_or_path {out}/model"
    )
    train = f"{common} --batch-size 16 --weight_decay 0.1 --max_grad_norm_clip 1.0 --learning_rate 2e-3"
    ckpt = f"{out}/pef/checkpoint.pt"
    return "\n".join(
        [
            "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1",
            "cd <tutorials>/generative_nlp",
            f"python generative_train.py compile {train} --pef-name=train --output-folder={out}/pef",
            f"python generative_train.py run {train} --data_dir {out}/hdf5 --checkpoint_name {ckpt}"
            f" --steps {steps} --subsample_eval 1.0 --min_eval_acc 0.9 --pef {out}/pef/train/train.pef",
            f"python generative_inference.py compile --inference {common} --batch-size 1"
            f" --pef-name=inference --output-folder={out}/pef",
            f"python generative_inference.py run --inference {common} --batch-size 1 --data_dir {out}/prompts.jsonl"
            f" --max_tokens_to_generate 4 --checkpoint_name {ckpt} --pef {out}/pef/inference/inference.pef",
        ]
    )


def write_assets(out: str | Path, max_seq_length: int = 64, n_train: int = 4800, n_dev: int = 480) -> Path:
    """Everything the tutorial needs, under `out` (see the module docstring)."""
    from transformers import GPT2TokenizerFast

    out = Path(out).resolve()
    make_model_folder(out / "model")
    shutil.copyfile(TINY_CONFIG, out / "config.json")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(out / "model"))
    write_hdf5_split(out / "hdf5", tokenizer, sentiment_examples(n_train, seed=1), max_seq_length, "train")
    write_hdf5_split(out / "hdf5", tokenizer, sentiment_examples(n_dev, seed=2), max_seq_length, "dev")
    write_jsonl(out / "prompts.jsonl", sentiment_examples(20, seed=3))
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: write the assets and print the tutorial's commands."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--train", type=int, default=4800, help="training examples")
    parser.add_argument("--dev", type=int, default=480, help="dev examples")
    args = parser.parse_args(argv)
    out = write_assets(args.outdir, args.max_seq_length, args.train, args.dev)
    print(f"wrote {out}\n\n{tutorial_commands(out, args.max_seq_length)}")


if __name__ == "__main__":
    main()
