"""Train a Hugging Face Llama and serve it with a KV cache, both compiled ahead of time into PEFs.

A tiny Llama (examples/llama/tiny_llama_config.json: RoPE, RMSNorm, SiLU MLP, grouped-query
attention) learns the synthetic sentiment task of examples/gpt2_assets.py (data and a byte-level
BPE tokenizer made here, nothing downloaded):

python examples/llama_app.py compile -b 16 --max-seq-length 48 --pef-name llama
python examples/llama_app.py run -b 16 --max-seq-length 48 -p out/llama/llama.pef --steps 150 --checkpoint out/llama_ckpt
python examples/llama_app.py compile --inference -b 1 --max-seq-length 64 --prompt-length 48 --pef-name llama_gen
python examples/llama_app.py run --inference -b 1 --max-seq-length 64 --prompt-length 48 -p out/llama_gen/llama_gen.pef \
    --checkpoint out/llama_ckpt --prompt "SENTIMENT ANALYSIS: the plot was truly superb QUESTION: ..." --max-new-tokens 2

Training: one whole step per `session.run` (forward, backward, clipping, AdamW with and without
weight decay), the mean next-token loss over each example's completion. `run --checkpoint DIR`
writes a Hugging Face folder (`save_pretrained`: config, weights and tokenizer) that
`AutoModelForCausalLM.from_pretrained(DIR)` loads. Inference compiles the *prompt* and *token*
programs of a static KV cache (`sambaflow.samba.generation`) and generates with them: one line
`completion: <new text, repr()>` per prompt, then the speed in new tokens/s.
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import sambaflow.samba.utils as utils
from sambaflow import samba
from sambaflow.samba.generation import CachedGenerator, KVCacheLM, Sampling, cached_graph_inputs
from sambaflow.samba.utils.argparser import parse_app_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpt2_assets as assets  # noqa: E402  (the task and its tokenizer)

TINY_CONFIG = Path(__file__).resolve().parent / "llama" / "tiny_llama_config.json"
IGNORE = -100  # label of positions the loss skips (prompt tokens, padding)


class LlamaLoss(nn.Module):
    """The causal LM returning its mean next-token loss over the labelled positions, and the logits."""

    def __init__(self, lm: LlamaForCausalLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels):
        logits = self.lm(input_ids=input_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=IGNORE)
        return loss, logits


def add_args(parser) -> None:
    parser.add_argument("--max-seq-length", type=int, default=48, help="tokens per example; KV cache length")
    parser.add_argument(
        "--prompt-length",
        type=int,
        default=None,
        help="inference: longest prompt (default: max-seq-length - 16)",
    )
    parser.add_argument(
        "--config", default=str(TINY_CONFIG), help="Llama config JSON (a checkpoint's own wins)"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights' dtype"
    )
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not norms)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (global norm)")


def add_run_args(parser) -> None:
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument(
        "--checkpoint", default=None, help="Hugging Face folder to write (train) or read (inference)"
    )
    parser.add_argument(
        "--tokenizer-dir", default="out/llama_tokenizer", help="where the local tokenizer is made"
    )
    parser.add_argument("--min-eval-acc", type=float, default=0.0, help="fail below this accuracy")
    parser.add_argument("--log-losses", default=None, help="write every step's loss to this JSON file")
    parser.add_argument("--prompt", action="append", default=[], help="inference: a prompt (repeatable)")
    parser.add_argument("--prompts", default=None, help="inference: a file with one prompt a line")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="inference: tokens to generate")
    parser.add_argument("--do-sample", action="store_true", help="inference: sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability")


def make_model(args) -> LlamaForCausalLM:
    """From the checkpoint folder (inference run), else a fresh model of `--config`."""
    dtype = getattr(torch, args.dtype)
    checkpoint = getattr(args, "checkpoint", None)
    if args.inference and args.command == "run" and checkpoint and Path(checkpoint).exists():
        print(f"Loaded checkpoint {checkpoint}")
        return LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=dtype)
    return LlamaForCausalLM(LlamaConfig.from_json_file(args.config)).to(dtype)


def training_inputs(args) -> tuple:
    shape = (args.batch_size, args.max_seq_length)
    ids = samba.from_torch_tensor(torch.zeros(shape, dtype=torch.int32), name="input_ids", batch_dim=0)
    labels = samba.from_torch_tensor(torch.zeros(shape, dtype=torch.int32), name="labels", batch_dim=0)
    return ids, labels


def get_optimizers(args, model: nn.Module) -> list:
    """AdamW on the weights with decay, and on the norms without (as the modelzoo's apps group them)."""
    decayed = [p for n, p in model.named_parameters() if "norm" not in n]
    undecayed = [p for n, p in model.named_parameters() if "norm" in n]
    common = dict(lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=args.max_grad_norm)
    return [
        samba.optim.AdamW(decayed, weight_decay=args.weight_decay, **common),
        samba.optim.AdamW(undecayed, weight_decay=0.0, **common),
    ]


def labelled(input_ids: torch.Tensor, token_types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token labels: the completion and its end token; IGNORE elsewhere."""
    targets = torch.cat([token_types[:, 1:], torch.full_like(token_types[:, :1], assets.PADDING)], dim=1)
    trained = (targets == assets.COMPLETION) | (targets == assets.SEP)
    labels = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).masked_fill(~trained, IGNORE)
    return input_ids.int(), labels.int()


def train(args, model: LlamaLoss, tokenizer) -> None:
    samba.check_output_path(args.log_losses, "--log-losses")  # before training, not after
    ids, types = assets.tokenize_examples(tokenizer, assets.sentiment_examples(4000, 1), args.max_seq_length)
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in range(args.steps):
        rows = torch.randint(0, len(ids), (args.batch_size,), generator=generator)
        loss, _ = samba.session.run(labelled(ids[rows], types[rows]), model.output_tensors)
        losses.append(float(loss))
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            print(f"Step [{step + 1}/{args.steps}], Loss: {losses[-1]:.4f}", flush=True)
    accuracy = evaluate(args, model, tokenizer)
    print(f"Eval accuracy: {accuracy:.4f}")
    if args.checkpoint:
        samba.session.to_cpu(model)
        model.lm.save_pretrained(args.checkpoint)  # config and safetensors weights
        tokenizer.save_pretrained(args.checkpoint)
        print(f"Saved checkpoint {args.checkpoint}")
    if args.log_losses:
        samba.save_json({"losses": losses, "accuracy": accuracy}, args.log_losses)  # atomic
    if accuracy < args.min_eval_acc:
        raise SystemExit(f"eval accuracy {accuracy:.4f} is below --min-eval-acc {args.min_eval_acc}")


def evaluate(args, model: LlamaLoss, tokenizer) -> float:
    """Exact match of the greedy next token at the completion positions (the `fwd` section)."""
    ids, types = assets.tokenize_examples(tokenizer, assets.sentiment_examples(320, 2), args.max_seq_length)
    correct = total = 0
    for start in range(0, len(ids) - args.batch_size + 1, args.batch_size):
        inputs, labels = labelled(
            ids[start : start + args.batch_size], types[start : start + args.batch_size]
        )
        _, logits = samba.session.run((inputs, labels), model.output_tensors, section_types=["fwd"])
        completion = torch.cat(
            [
                types[start : start + args.batch_size, 1:] == assets.COMPLETION,
                torch.zeros(args.batch_size, 1, dtype=torch.bool),
            ],
            dim=1,
        )
        correct += int((logits.argmax(-1)[completion] == labels[completion]).sum())
        total += int(completion.sum())
    return correct / total


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.rstrip("\n") for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        prompts = [e["prompt"] for e in assets.sentiment_examples(4, seed=3)]
    return [p.replace("\\n", "\n") for p in prompts]  # a prompt file or flag writes newlines as \n


def generate(args, cached: KVCacheLM, tokenizer) -> None:
    generator = CachedGenerator(cached)
    sampling = Sampling(args.do_sample, args.temperature, args.top_k, args.top_p, seed=args.seed)
    prompts = read_prompts(args)
    started, produced = time.perf_counter(), 0
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first : first + args.batch_size]
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in batch]
        new = generator.generate(ids, args.max_new_tokens, sampling, eos_token_id=tokenizer.eos_token_id)
        for tokens in new:
            print(f"completion: {tokenizer.decode(tokens)!r}", flush=True)
            produced += len(tokens)
    seconds = time.perf_counter() - started
    print(f"generated {produced} new tokens in {seconds:.2f} s: {produced / seconds:.1f} new tokens/s")


def local_tokenizer(args):
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and (Path(checkpoint) / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(checkpoint)
    return AutoTokenizer.from_pretrained(str(assets.make_tokenizer(args.tokenizer_dir)))


def main(argv) -> None:
    args = parse_app_args(argv=argv, common_parser_fn=add_args, run_parser_fn=add_run_args)
    utils.set_seed(args.seed)
    lm = make_model(args)
    if args.inference:
        model = KVCacheLM(lm.eval(), args.batch_size, args.max_seq_length)
        inputs, optims = cached_graph_inputs(model, args.prompt_length or args.max_seq_length - 16), None
    else:
        model = LlamaLoss(lm)
        inputs = training_inputs(args)
    samba.from_torch_model_(model)
    optims = None if args.inference else get_optimizers(args, model)
    if args.command == "compile":
        samba.session.compile(model, inputs, optims, name="llama")
    elif args.command == "run":
        utils.trace_graph(model, inputs, optims, pef=args.pef)
        tokenizer = local_tokenizer(args)
        generate(args, model, tokenizer) if args.inference else train(args, model, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
