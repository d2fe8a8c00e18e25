"""Fine-tune a Hugging Face GPT-2 and generate with it, written like SambaNova's generative_nlp tutorial.

A tiny GPT-2 (examples/gpt2/tiny_gpt2_config.json) learns a synthetic sentiment task in the
tutorial's prompt form (examples/gpt2_assets.py: data and a tokenizer made here, nothing downloaded):

python examples/gpt2_app.py compile -b 16 --max-seq-length 48 --pef-name gpt2
python examples/gpt2_app.py run -b 16 --max-seq-length 48 -p out/gpt2/gpt2.pef --steps 300 --checkpoint out/gpt2.pt
python examples/gpt2_app.py compile --inference -b 1 --max-seq-length 48 --pef-name gpt2_gen
python examples/gpt2_app.py run --inference -b 1 --max-seq-length 48 -p out/gpt2_gen/gpt2_gen.pef --checkpoint out/gpt2.pt

Training feeds the tutorial's dtypes (int32 token ids, int16 positions and labels), starts backward
from a per-token loss weight (`out.sn_grad`), runs all four sections with `lr` and dropout `p` as
run-time hyperparameters, evaluates with the `fwd` section at `p=0`, and saves a checkpoint.
Inference compiles the forward pass alone and runs Hugging Face's `generate` with the model's
forward replaced by `samba.session.run`.
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
from transformers.modeling_outputs import CausalLMOutput

import sambaflow.samba.utils as utils
from sambaflow import samba
from sambaflow.samba.utils.argparser import parse_app_args
from sambaflow.sambacollections import OrderedSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpt2_assets as assets  # noqa: E402


class GPT2TokenLoss(nn.Module):
    """GPT-2 returning a per-token loss (`reduction='none'`) and the logits, like the tutorial's head."""

    def __init__(self, lm: GPT2LMHeadModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, labels):
        logits = self.lm(input_ids=input_ids, position_ids=position_ids).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="none")
        return loss, logits


def add_args(parser) -> None:
    parser.add_argument("--max-seq-length", type=int, default=48, help="tokens per example (padded)")
    parser.add_argument("--config", default=str(assets.TINY_CONFIG), help="GPT-2 config JSON")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW weight decay (not biases, LayerNorms)"
    )
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping per optimizer")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout probability while training")


def add_run_args(parser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--prompt-loss-weight", type=float, default=0.1, help="loss weight of prompt tokens")
    parser.add_argument(
        "--checkpoint", default="out/gpt2.pt", help="checkpoint to write (train) or read (inference)"
    )
    parser.add_argument(
        "--tokenizer-dir", default="out/gpt2_tokenizer", help="where the local tokenizer is made"
    )
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts to generate for (inference)")
    parser.add_argument("--min-eval-acc", type=float, default=0.0, help="fail below this accuracy")
    parser.add_argument("--log-losses", default=None, help="write every step's loss to this JSON file")


def trace_inputs(args) -> tuple:
    """Named dummy inputs of the compiled shapes (the training loss head, or the bare LM)."""
    shape = (args.batch_size, args.max_seq_length)
    ids = samba.from_torch_tensor(torch.randint(0, 400, shape, dtype=torch.int32), name="input_ids")
    positions = torch.arange(args.max_seq_length).short().unsqueeze(0).expand(shape)
    positions = samba.from_torch_tensor(positions, name="input_position_ids")
    if not args.inference:
        labels = samba.from_torch_tensor(torch.ones(shape, dtype=torch.int16), name="labels")
        return ids, positions, labels
    mask = samba.from_torch_tensor(torch.ones(args.batch_size, 1, args.max_seq_length), name="attention_mask")
    return ids, None, mask, None, positions  # GPT2LMHeadModel.forward's positional arguments


def parameter_groups(model: nn.Module) -> tuple[list, list, list]:
    """The tutorial's grouping: embeddings, decayed weights, biases and LayerNorms (undecayed)."""
    embeddings = OrderedSet(p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    others = [(n, p) for n, p in model.named_parameters() if p not in embeddings]
    undecayed = [p for n, p in others if "bias" in n or ".ln" in n]
    decayed = [p for n, p in others if not ("bias" in n or ".ln" in n)]
    return list(embeddings), decayed, undecayed


def get_optimizers(args, model: nn.Module) -> list:
    """Three AdamW (as the tutorial), each clipping its own gradients to `--max-grad-norm`."""
    embeddings, decayed, undecayed = parameter_groups(model)
    common = dict(lr=args.learning_rate, betas=(0.9, 0.997), eps=1e-8, max_grad_norm=args.max_grad_norm)
    return [
        samba.optim.AdamW(embeddings, weight_decay=args.weight_decay, **common),
        samba.optim.AdamW(decayed, weight_decay=args.weight_decay, **common),
        samba.optim.AdamW(undecayed, weight_decay=0.0, **common),
    ]


def runtime_inputs(input_ids: torch.Tensor) -> list:
    """Token ids, positions and next-token labels (-100 after the last token) in the compiled dtypes."""
    positions = torch.arange(input_ids.shape[1]).short().unsqueeze(0).expand(input_ids.shape)
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)
    return [
        samba.from_torch_tensor(input_ids.int(), name="input_ids"),
        samba.from_torch_tensor(positions, name="input_position_ids"),
        samba.from_torch_tensor(labels.short(), name="labels"),
    ]


def target_types(token_types: torch.Tensor) -> torch.Tensor:
    """The token type of each position's label (the next token); padding after the last."""
    return torch.cat([token_types[:, 1:], torch.full_like(token_types[:, :1], assets.PADDING)], dim=1)


def loss_weights(token_types: torch.Tensor, prompt_weight: float) -> torch.Tensor:
    """Per-token gradient seed: completion and end tokens 1, prompt tokens `prompt_weight`, padding 0."""
    targets = target_types(token_types)
    weights = (targets == assets.COMPLETION).float() + (targets == assets.SEP).float()
    weights += prompt_weight * (targets == assets.PROMPT).float()
    return (weights / weights.sum()).flatten()


def train(args, model: nn.Module, tokenizer) -> None:
    ids, types = assets.tokenize_examples(tokenizer, assets.sentiment_examples(4000, 1), args.max_seq_length)
    generator = torch.Generator().manual_seed(args.seed)
    hyperparams = {"lr": args.learning_rate, "p": args.dropout}
    losses = []
    for step in range(args.steps):
        rows = torch.randint(0, len(ids), (args.batch_size,), generator=generator)
        weights = loss_weights(types[rows], args.prompt_loss_weight)
        model.output_tensors[0].sn_grad = weights
        loss, _ = samba.session.run(
            runtime_inputs(ids[rows]),
            model.output_tensors,
            hyperparam_dict=hyperparams,
            section_types=["FWD", "BCKWD", "GRADNORM", "OPT"],
        )
        losses.append(float((loss * weights).sum()))
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"Step [{step + 1}/{args.steps}], Loss: {losses[-1]:.4f}", flush=True)
    accuracy = evaluate(args, model, tokenizer)
    print(f"Eval accuracy: {accuracy:.4f}")
    samba.session.to_cpu(model)
    samba.save(model.lm.state_dict(), args.checkpoint)  # atomic: a kill leaves the old one whole
    print(f"Saved checkpoint {args.checkpoint}")
    if args.log_losses:
        samba.save_json({"losses": losses, "accuracy": accuracy}, args.log_losses)
    if accuracy < args.min_eval_acc:
        raise SystemExit(f"eval accuracy {accuracy:.4f} is below --min-eval-acc {args.min_eval_acc}")


def evaluate(args, model: nn.Module, tokenizer) -> float:
    """Exact match of the greedy next token at every completion position (the `fwd` section, p=0)."""
    ids, types = assets.tokenize_examples(tokenizer, assets.sentiment_examples(320, 2), args.max_seq_length)
    correct = total = 0
    for start in range(0, len(ids) - args.batch_size + 1, args.batch_size):
        batch = ids[start : start + args.batch_size]
        inputs = runtime_inputs(batch)
        _, logits = samba.session.run(inputs, model.output_tensors, {"lr": 0.0, "p": 0.0}, ["FWD"])
        at = target_types(types[start : start + args.batch_size]) == assets.COMPLETION
        correct += int((logits.argmax(-1)[at] == inputs[2][at]).sum())
        total += int(at.sum())
    return correct / total


def generation_inputs(ids: torch.Tensor, length: int, pad_id: int) -> tuple:
    """GPT2LMHeadModel.forward's positional arguments for one prompt padded to the compiled
    `length`: token ids, attention mask `[1, 1, length]` (1 on the prompt), positions."""
    given = ids.shape[1]
    mask = F.pad(torch.ones(1, given), (0, length - given))[:, None, :]
    return (
        samba.from_torch_tensor(F.pad(ids, (0, length - given), value=pad_id).int(), name="input_ids"),
        None,
        samba.from_torch_tensor(mask, name="attention_mask"),
        None,
        samba.from_torch_tensor(torch.arange(length).short().unsqueeze(0), name="input_position_ids"),
    )


def generate(args, model: GPT2LMHeadModel, tokenizer) -> None:
    """Hugging Face's generate, with every forward call run on the device (no KV cache)."""
    if Path(args.checkpoint).exists():
        samba.load(args.checkpoint, model, model_key=None)
        samba.session.to_rdu(model)
        print(f"Loaded checkpoint {args.checkpoint}")
    else:
        print(f"note: no checkpoint at {args.checkpoint}: generating with the initial (random) weights")
    length, outputs = args.max_seq_length, model.output_tensors

    def forward_on_device(self, *_, **kwargs):
        given = kwargs["input_ids"].shape[1]
        inputs = generation_inputs(kwargs["input_ids"], length, tokenizer.eos_token_id)
        logits = samba.session.run(inputs, outputs, hyperparam_dict={"p": 0.0}, section_types=["fwd"])[0]
        return CausalLMOutput(logits=logits[:, :given].float())

    type(model).__call__ = forward_on_device  # as the tutorial does: generate() calls self(...)
    for example in assets.sentiment_examples(args.num_prompts, seed=3):
        prompt = tokenizer(example["prompt"], return_tensors="pt")
        generated = model.generate(
            **prompt, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
        print(f"{tokenizer.decode(generated[0])!r} (expected {example['completion']!r})")


def main(argv) -> None:
    args = parse_app_args(argv=argv, common_parser_fn=add_args, run_parser_fn=add_run_args)
    utils.set_seed(args.seed)
    config = GPT2Config.from_json_file(args.config)
    config.use_cache = False  # no key/value cache outputs: generation reruns the padded sequence
    lm = GPT2LMHeadModel(config).train()  # dropout stays in the graph; `p` turns it off at run time
    model = lm if args.inference else GPT2TokenLoss(lm)
    samba.from_torch_model_(model)
    optims = None if args.inference else get_optimizers(args, model)
    inputs = trace_inputs(args)
    if args.command == "compile":
        samba.session.compile(model, inputs, optims, name="gpt2", init_output_grads=True)
    elif args.command == "run":
        samba.check_output_path(None if args.inference else args.checkpoint, "--checkpoint")
        samba.check_output_path(args.log_losses, "--log-losses")
        utils.trace_graph(model, inputs, optims, pef=args.pef)
        tokenizer = GPT2TokenizerFast.from_pretrained(str(assets.make_tokenizer(args.tokenizer_dir)))
        generate(args, model, tokenizer) if args.inference else train(args, model, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
