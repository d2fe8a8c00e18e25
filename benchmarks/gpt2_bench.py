"""GPT-2 training-step and greedy-generation benchmark: eager, torch.compile, our session.run, GEMM floor.

    export SAMBAFLOW_CACHE_DIR=/tmp/bench_cache
    python benchmarks/gpt2_bench.py --json /tmp/gpt2.json      # tiny + small (an hour or more here)
    python benchmarks/gpt2_bench.py --quick                    # tiny only, few steps (smoke test)
    python benchmarks/gpt2_bench.py --configs small --rounds 8 --steps 2 --no-memory

Model: Hugging Face GPT2LMHeadModel (transformers' default attention, sdpa), fp32 on the CPU, in
train() mode with every dropout 0 (resid/embd/attn_pdrop = 0.0), use_cache=False. Configs (the
JSON files in examples/gpt2/ give the rest of the GPT2Config; vocab 50257 and the sizes below
override them):
  tiny   2 layers, n_embd 64, 4 heads, n_positions 1024, vocab 50257, batch 32, seq 16
  small  12 layers, n_embd 768, 12 heads (GPT-2 small), vocab 50257, batch 2, seq 128
Loss: HF's own `model(input_ids, labels=labels).loss` (mean next-token cross entropy). Three
AdamW optimizers as in SambaNova's GPT-2 tutorial: the embeddings (wte, tied to lm_head, and wpe;
weight decay 0.1), the other weights (0.1), biases and LayerNorm weights ("bias" or "ln" in the
name; 0). lr 1e-4, betas (0.9, 0.997), eps 1e-8; each optimizer's gradients are clipped to a
global norm of 1.0 (torch.nn.utils.clip_grad_norm_ per optimizer's parameters).

Training-step variants:
  eager      the model + three torch.optim.AdamW (default options: the single-tensor loop on the
             CPU); zero_grad, forward, backward, clip_grad_norm_ per optimizer, step
  compile    torch.compile(model) (default mode) with the same eager optimizers and clipping
  fullgraph  one torch.compile(fullgraph=True) function: forward, loss.backward() (traced with
             torch._dynamo.config.trace_autograd_ops = True), per-group foreach clipping and a
             foreach AdamW. Forms, tried in --fullgraph-forms order until one compiles (the output
             says which ran): 'foreach' torch.optim._functional.adamw(foreach=True); 'manual_foreach'
             the same update written with torch._foreach_* ops (0-d tensor bias corrections);
             'single_tensor' torch.optim._functional.adamw(foreach=False); 'autograd_grad'
             torch.autograd.grad instead of backward, with the manual foreach update.
             (torch 2.13 CPU: 'foreach' fails in dynamo, "Expected scalars to be on CPU, got meta",
             and torch.optim.AdamW(foreach/fused).step() graph-breaks, so 'manual_foreach' runs.)
  ours       samba.from_torch_model_(model), three samba.optim.AdamW(..., max_grad_norm=1.0),
             utils.trace_graph(model, GPT2LMHeadModel.forward's positional arguments with
             SambaTensors `input_ids` and `labels` and None for the rest, optims,
             backend="inductor"); each step is one samba.session.run(inputs, outputs)
  floor      the step's matrix products alone, into preallocated outputs: per layer c_attn,
             attn c_proj, mlp c_fc, mlp c_proj (addmm forward, two mm backward each), attention's
             QK^T and PV (bmm forward, two bmm backward each), and lm_head (forward, two backward).
             A lower bound: no variant can be faster.

Method (as benchmarks/step_bench.py, whose helpers this imports): per config, all variants in ONE
process, interleaved: each round runs a block of --steps steps of every variant (the starting
variant rotates each round), every step timed on its own; inputs rotate over 4 pre-generated
batches; medians over all timed steps, after a warm-up; Python's garbage collector is paused while
timing. The share of CPU time other processes took while timing is recorded (/proc/stat), with a
warning above 3%. Before timing, each variant runs 3 steps from the same initial weights and
batches; the change of every parameter tensor, d = p - p_initial, must match eager's:
||d - d_eager|| / ||d_eager|| <= 2e-3 per tensor (Adam turns rounding in near-zero gradients into
whole steps of lr, so elementwise parameter errors are no test). Where eager fp32 itself is that
far from the same 3 steps in float64, the tensor's tolerance is twice eager's own error: on
small, h.0.attn.c_attn.bias (its key third has an exactly zero gradient, softmax ignores a key
bias, so its update is pure rounding) sits 2.2e-3 from float64, and every compiled variant 2.8e-3
from eager; the JSON keeps the flat-2e-3 verdict too ("ok_at_flat_2e-3"). A failing variant is marked WRONG
and left out of "best torch.compile"; the exit status is 1 if ours is wrong (or generates other
tokens) or a config fails. For scale, the output also scores two deliberate mistakes (eager
without weight decay, eager without clipping): seen on tiny, no decay 2.5e-2 (caught), no
clipping 0 (the gradient norms stay below 1.0, so clipping never engages; a note says so).
Each config runs in its own fresh process, and there the setup order is eager, compile, fullgraph,
ours: on torch 2.13, once the fullgraph step (trace_autograd_ops) has compiled, any later
torch.compile(model) in that process fails in dynamo, even after torch._dynamo.reset() (it replays
the fullgraph step's .grad mutations: "'model' not in cell_and_freevars"). For the same reason a
failed fullgraph form does not call torch._dynamo.reset() (compile's model would recompile).

Peak memory: each variant (floor excepted) runs again in a fresh subprocess: build the model and
batches, gc + malloc_trim, read VmRSS (the base); set the variant up and run 3 steps (compiles);
gc + malloc_trim; reset the high-water mark (`echo 5 > /proc/self/clear_refs`); run --memory-steps
steps; read VmHWM. "peak" = VmHWM - base: what the variant needs beyond the model's weights
(optimizer state, gradients, activations, compiled code, copies it keeps), at the steady-state
peak of a step; "step" = VmHWM - VmRSS just before those steps (the transient part alone). The
compile-time peak is excluded (it is reported as ru_maxrss in the JSON).

Generation (tiny config; --no-generate skips it): greedy `model.generate(prompt, max_length=64,
do_sample=False, use_cache=False)` from an 8-token prompt (56 new tokens), eager HF vs ours: a
forward-only graph (utils.trace_graph(model, (input_ids [1, 64] int32, None, attention_mask
[1, 1, 64] float32, None, input_position_ids [1, 64] int16), None, backend="inductor")) run by HF's
generate with GPT2LMHeadModel.__call__ replaced (during our calls only) by a function that pads
the ids to 64, runs samba.session.run(..., hyperparam_dict={"p": 0.0}, section_types=["fwd"]) and
returns CausalLMOutput(logits=logits[:, :given]). Both must generate the same tokens. Timed like
the steps (interleaved rounds of one generate call each); reported as new tokens per second.

Targets printed: tiny eager/ours >= 1.5 and best torch.compile/ours >= 1.1; small >= 1.25 and
>= 1.02, and peak memory ours <= 1.10 x eager's; generation ours tokens/s >= eager's.

Progress goes to stderr, the tables to stdout, everything to --json. Ratios: eager/ours and
best-torch.compile/ours above 1 mean ours is faster; ours/floor is 1.0 at the floor. Always set
SAMBAFLOW_CACHE_DIR (e.g. /tmp/bench_cache): our compiled programs are cached there, torch.compile's
in /tmp/torchinductor_$USER, so a second run compiles much less. On a busy machine, OpenMP's 2
threads lose up to 30x here (seen: one greedy generate 0.22 s with OMP_NUM_THREADS=1, 7.6 s with
2 threads beside a busy neighbour); OMP_NUM_THREADS=1 gives steadier numbers. Our programs are
cached by graph, not thread count, and Inductor bakes the thread count into its C++ kernels: when
changing OMP_NUM_THREADS, use another SAMBAFLOW_CACHE_DIR, or ours runs with the old count. The
small config takes long here (eager step about 2 s, compiles minutes each).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import re
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

import gpt2_app  # noqa: E402  (examples/gpt2_app.py: the tutorial's groups, generation inputs)
import harness  # noqa: E402
import transformers  # noqa: E402
from harness import (  # noqa: E402  (benchmarks/harness.py: the shared method)
    cpu_seconds,
    fmt,
    machine,
    medians,
    other_cpu_share,
    proc_status_kb,
    ratio,
    settle,
)
from step_bench import host_params, relative_error  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402

import sambaflow.samba.utils as utils  # noqa: E402
from sambaflow import samba  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 1e-4, (0.9, 0.997), 1e-8, 0.1, 1.0
GROUP_DECAY = (WEIGHT_DECAY, WEIGHT_DECAY, 0.0)  # embeddings, other weights, biases + LayerNorms
VOCAB, EOS = 50257, 50256
N_BATCHES = 4
CHANGE_TOL = 2e-3
NOISE_FACTOR = 2.0  # a tensor's tolerance: max(CHANGE_TOL, this x eager fp32's own error vs float64)
OTHER_CPU_WARN = 0.03
GEN_LENGTH, PROMPT_LENGTH = 64, 8
TRAIN_VARIANTS = ("eager", "compile", "fullgraph", "ours", "floor")
T0 = time.perf_counter()

Step = Callable[[int], Any]
Params = Callable[[], dict[str, torch.Tensor]]


def say(message: str) -> None:
    print(f"[gpt2_bench {time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- configurations -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    name: str
    json_file: str
    n_layer: int
    n_embd: int
    n_head: int
    batch: int
    seq: int
    rounds: int  # default interleaving rounds and steps per round (block)
    block: int
    n_positions: int = 1024

    def gpt2_config(self) -> GPT2Config:
        path = ROOT / "examples" / "gpt2" / self.json_file
        base = GPT2Config.from_json_file(str(path)).to_dict() if path.exists() else {}
        base.update(
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            n_positions=self.n_positions,
            n_ctx=self.n_positions,
            vocab_size=VOCAB,
            bos_token_id=EOS,
            eos_token_id=EOS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            use_cache=False,
        )
        return GPT2Config(**base)

    def build(self, seed: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(self.gpt2_config()).train()
        # HF's default loss, named: an unset loss_type logs a warning that torch.compile breaks on
        model.loss_type = "ForCausalLM"
        return model

    def batches(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed + 1)
        out = []
        for _ in range(N_BATCHES):
            ids = torch.randint(VOCAB, (self.batch, self.seq), generator=gen)
            out.append((ids, ids.clone()))  # HF shifts the labels by one inside the loss
        return out


CONFIGS = {
    "tiny": Config("tiny", "tiny_gpt2_config.json", 2, 64, 4, batch=32, seq=16, rounds=10, block=3),
    "small": Config("small", "gpt2_small_like_config.json", 12, 768, 12, batch=2, seq=128, rounds=5, block=2),
}


# --- optimizers ---------------------------------------------------------------------------------
def torch_optimizers(model: nn.Module, decays=GROUP_DECAY) -> list[torch.optim.AdamW]:
    return [
        torch.optim.AdamW(group, lr=LR, betas=BETAS, eps=EPS, weight_decay=decay)
        for group, decay in zip(gpt2_app.parameter_groups(model), decays)
    ]


def samba_optimizers(model: nn.Module) -> list:
    return [
        samba.optim.AdamW(group, lr=LR, betas=BETAS, eps=EPS, weight_decay=decay, max_grad_norm=MAX_NORM)
        for group, decay in zip(gpt2_app.parameter_groups(model), GROUP_DECAY)
    ]


# --- training-step variants -----------------------------------------------------------------------
def eager_step(model: nn.Module, forward: Callable, batches, decays=GROUP_DECAY, clip: bool = True) -> Step:
    opts = torch_optimizers(model, decays)
    groups = [[p for g in o.param_groups for p in g["params"]] for o in opts]

    def step(i: int) -> Any:
        ids, labels = batches[i % N_BATCHES]
        for opt in opts:
            opt.zero_grad()
        loss = forward(ids, labels=labels).loss
        loss.backward()
        for params in groups if clip else []:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        for opt in opts:
            opt.step()
        return loss

    return step


def clip_(grads: list[torch.Tensor]) -> None:
    """clip_grad_norm_(max_norm 1.0) on one group's gradients, with foreach ops."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(MAX_NORM / (total + 1e-6), max=1.0))


class AdamWState:
    """One group's AdamW state (torch's layout: exp_avg, exp_avg_sq, a float32 0-d step each)."""

    def __init__(self, params: list[torch.Tensor], weight_decay: float) -> None:
        self.params, self.weight_decay = params, weight_decay
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.steps = [torch.tensor(0.0) for _ in params]

    def functional(self, grads: list[torch.Tensor], foreach: bool) -> None:
        torch.optim._functional.adamw(
            self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps,
            foreach=foreach, amsgrad=False, beta1=BETAS[0], beta2=BETAS[1], lr=LR,
            weight_decay=self.weight_decay, eps=EPS, maximize=False,
        )  # fmt: skip

    def manual_foreach(self, grads: list[torch.Tensor]) -> None:
        """torch's _multi_tensor_adam (decoupled decay) with the bias corrections as 0-d tensors."""
        beta1, beta2 = BETAS
        torch._foreach_add_(self.steps, 1.0)
        torch._foreach_mul_(self.params, 1 - LR * self.weight_decay)
        torch._foreach_lerp_(self.exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(self.exp_avg_sqs, beta2)
        torch._foreach_addcmul_(self.exp_avg_sqs, grads, grads, 1 - beta2)
        step = self.steps[0]  # all of a group's steps are equal
        step_size = -LR / (1 - torch.pow(beta1, step))
        denom = torch._foreach_sqrt(self.exp_avg_sqs)
        torch._foreach_div_(denom, torch.sqrt(1 - torch.pow(beta2, step)))
        torch._foreach_add_(denom, EPS)
        update = torch._foreach_div(self.exp_avgs, denom)
        torch._foreach_mul_(update, step_size)
        torch._foreach_add_(self.params, update)


FULLGRAPH_FORMS = ("foreach", "manual_foreach", "single_tensor", "autograd_grad")
FULLGRAPH_DESCRIPTION = {
    "foreach": "forward + loss.backward() + foreach clipping + torch.optim._functional.adamw(foreach=True)",
    "manual_foreach": "forward + loss.backward() + foreach clipping + hand-written foreach AdamW",
    "single_tensor": "forward + loss.backward() + foreach clipping + functional single-tensor AdamW",
    "autograd_grad": "forward + torch.autograd.grad + foreach clipping + hand-written foreach AdamW",
}


def fullgraph_step(model: nn.Module, batches, form: str) -> Step:
    """One torch.compile(fullgraph=True) function: forward, gradients, clipping, AdamW per group."""
    states = [AdamWState(g, d) for g, d in zip(gpt2_app.parameter_groups(model), GROUP_DECAY)]
    params = [p for s in states for p in s.params]

    def update(grads: list[torch.Tensor]) -> None:
        start = 0
        for s in states:
            group = grads[start : start + len(s.params)]
            start += len(s.params)
            clip_(group)
            if form in ("foreach", "single_tensor"):
                s.functional(group, foreach=form == "foreach")
            else:
                s.manual_foreach(group)

    def whole_step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = model(ids, labels=labels).loss
        if form == "autograd_grad":
            grads = list(torch.autograd.grad(loss, params))
        else:
            for p in params:
                p.grad = None
            loss.backward()
            grads = [p.grad for p in params]
        with torch.no_grad():
            update(grads)
        return loss.detach()

    compiled = torch.compile(whole_step, fullgraph=True)

    def step(i: int) -> Any:
        return compiled(*batches[i % N_BATCHES])

    return step


def samba_train_inputs(ids: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    return [samba.from_torch_tensor(ids, name="input_ids"), samba.from_torch_tensor(labels, name="labels")]


def ours_setup(model: nn.Module, batches) -> tuple[Step, Params]:
    """trace_graph of the whole step (inductor); a step is one session.run."""
    samba.from_torch_model_(model)
    optims = samba_optimizers(model)
    ids, labels = samba_train_inputs(*batches[0])
    # GPT2LMHeadModel.forward(input_ids, past_key_values, attention_mask, token_type_ids,
    # position_ids, head_mask, inputs_embeds, encoder_hidden_states, encoder_attention_mask, labels)
    inputs = (ids, None, None, None, None, None, None, None, None, labels)
    with contextlib.redirect_stdout(sys.stderr):  # sambaflow's progress lines
        outputs = utils.trace_graph(model, inputs, optims, backend="inductor")
    feeds = [samba_train_inputs(*b) for b in batches]
    run = samba.session.run

    def step(i: int) -> Any:
        return run(feeds[i % N_BATCHES], outputs)

    def params() -> dict[str, torch.Tensor]:
        samba.session.to_cpu(model)
        return host_params(model)

    return step, params


# --- the GEMM floor ---------------------------------------------------------------------------------
def gemm_shapes(c: Config) -> list[tuple[int, int, int, int, bool, bool, bool]]:
    """(batch, m, k, n, a transposed, b transposed, bias) of every product of one step.

    batch 0 is a plain mm; a transposed view stands where autograd multiplies by one (W^T in
    input gradients, activations^T in weight gradients). GPT-2's Conv1D stores W as [in, out].
    """
    t, h, v, s = c.batch * c.seq, c.n_embd, VOCAB, c.seq
    bh, d = c.batch * c.n_head, c.n_embd // c.n_head
    shapes = []
    for k, n in ((h, 3 * h), (h, h), (h, 4 * h), (4 * h, h)):  # c_attn, attn c_proj, c_fc, mlp c_proj
        shapes += [
            (0, t, k, n, False, False, True),
            (0, t, n, k, False, True, False),
            (0, k, t, n, True, False, False),
        ]
    # attention: S = Q K^T, O = P V; backward dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
    shapes += [(bh, s, d, s, False, True, False), (bh, s, s, d, False, False, False)]
    shapes += [(bh, s, d, s, False, True, False), (bh, s, s, d, True, False, False)]
    shapes += [(bh, s, s, d, False, False, False), (bh, s, s, d, True, False, False)]
    shapes = shapes * c.n_layer
    # lm_head (tied to wte [V, H]): logits = x W^T; dx = g W; dW = g^T x
    shapes += [
        (0, t, h, v, False, True, False),
        (0, t, v, h, False, False, False),
        (0, v, t, h, True, False, False),
    ]
    return shapes


def operand(batch: int, rows: int, cols: int, transposed: bool, gen: torch.Generator) -> torch.Tensor:
    lead = (batch,) if batch else ()
    if transposed:
        return torch.randn(*lead, cols, rows, generator=gen).transpose(-1, -2)
    return torch.randn(*lead, rows, cols, generator=gen)


def floor_step(c: Config) -> Step:
    gen = torch.Generator().manual_seed(7)
    products = []
    for batch, m, k, n, at, bt, bias in gemm_shapes(c):
        a, b = operand(batch, m, k, at, gen), operand(batch, k, n, bt, gen)
        out = torch.empty(*((batch,) if batch else ()), m, n)
        products.append((a, b, torch.randn(n, generator=gen) if bias else None, out))

    def step(i: int) -> Any:
        for a, b, bias, out in products:
            if a.dim() == 3:
                torch.bmm(a, b, out=out)
            elif bias is None:
                torch.mm(a, b, out=out)
            else:
                torch.addmm(bias, a, b, out=out)
        return out

    return step


def make_variant(
    name: str, model: nn.Module, config: Config, batches, form: str | None
) -> tuple[Step, Params]:
    """The step of one variant on `model` (modified in place), and a reader of its parameters."""
    if name == "ours":
        return ours_setup(model, batches)
    if name == "eager":
        step = eager_step(model, model, batches)
    elif name == "compile":
        step = eager_step(model, torch.compile(model), batches)
    elif name == "fullgraph":
        step = fullgraph_step(model, batches, form or FULLGRAPH_FORMS[0])
    else:
        raise ValueError(f"unknown variant {name!r}")
    return step, lambda: host_params(model)


# --- the training phase -------------------------------------------------------------------------------
def three_steps(step: Step) -> float:
    start = time.perf_counter()
    for i in range(3):
        step(i)
    return time.perf_counter() - start


def change_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], initial) -> dict[str, float]:
    """Per tensor ||d - d_want|| / ||d_want||, d = p - p_initial (inf for NaN/inf)."""
    errors = {}
    for name, w in want.items():
        if not torch.isfinite(got[name]).all():
            errors[name] = math.inf
            continue
        d, d_want = got[name] - initial[name], w - initial[name]
        errors[name] = float((d - d_want).norm() / d_want.norm().clamp_min(1e-30))
    return errors


def tolerances(base: nn.Module, batches, want: dict[str, torch.Tensor], initial) -> dict[str, float]:
    """Per tensor max(2e-3, 2 x eager fp32's own change error against the same steps in float64)."""
    model = copy.deepcopy(base).double()
    three_steps(eager_step(model, model, batches))
    exact = {n: p.float() for n, p in host_params(model).items()}
    noise = change_errors(want, exact, initial)
    return {n: max(CHANGE_TOL, NOISE_FACTOR * e) for n, e in noise.items()}


def judge(errors: dict[str, float], tol: dict[str, float]) -> dict[str, Any]:
    worst = max(errors, key=lambda n: errors[n] / tol[n])  # closest to (or most over) its tolerance
    largest = max(errors, key=errors.get)
    return {
        "change_rel_err": errors[largest],
        "largest_tensor": largest,
        "largest_tensor_tol": tol[largest],
        "worst_tensor": worst,
        "worst_tensor_err": errors[worst],
        "worst_tensor_tol": tol[worst],
        "ok": all(errors[n] <= tol[n] for n in errors),
        "ok_at_flat_2e-3": max(errors.values()) <= CHANGE_TOL,
    }


def try_fullgraph(base: nn.Module, config: Config, batches, forms: list[str], notes: list[str]):
    """The first fullgraph form that compiles: (form, step, params, seconds), or None."""
    for form in forms:
        say(f"{config.name}: fullgraph form '{form}' (compiles: {FULLGRAPH_DESCRIPTION[form]})")
        model = copy.deepcopy(base)
        try:
            step, params = make_variant("fullgraph", model, config, batches, form)
            seconds = three_steps(step)
        except Exception as exc:  # a form dynamo cannot trace here: say so, try the next one
            text = str(exc).strip()
            why = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            inner = re.search(r"got (\w+Error\(.{0,200}?\))", text)  # the fake-tensor error's cause
            why = (why + (f": {inner.group(1)}" if inner else ""))[:400]
            notes.append(f"fullgraph form '{form}' does not compile here ({why})")
            say(f"  form '{form}' failed: {why}")
            continue  # no torch._dynamo.reset(): compile's model would recompile, and that fails
        return form, step, params, seconds
    notes.append("no fullgraph form compiled: the fullgraph row is missing")
    return None


def train_phase(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"notes": []}
    batches = config.batches(args.seed)
    torch._dynamo.reset()
    base = config.build(args.seed)
    result["attn_implementation"] = base.config._attn_implementation
    initial = host_params(base)
    steps: dict[str, Step] = {}
    params_of: dict[str, Params] = {}
    setup_s: dict[str, float] = {}
    wanted = [v for v in TRAIN_VARIANTS if v in args.variants]
    # eager first: the reference. compile before fullgraph: on torch 2.13, torch.compile(model)
    # compiling after the fullgraph step did fails in dynamo ("'model' not in cell_and_freevars")
    order = ("eager", "compile", "fullgraph", "ours", "floor")
    for name in [v for v in order if v in wanted or v == "eager"]:
        if name == "floor":
            steps[name] = floor_step(config)
            continue
        if name == "fullgraph":
            found = try_fullgraph(base, config, batches, args.fullgraph_forms, result["notes"])
            result["fullgraph_form"] = found[0] if found else None
            if found:
                steps[name], params_of[name], setup_s[name] = found[1:]
            continue
        say(f"{config.name}: training: {name} (3 steps{'; compiles' if name != 'eager' else ''})")
        start = time.perf_counter()
        step, params = make_variant(name, copy.deepcopy(base), config, batches, None)
        three_steps(step)
        steps[name], params_of[name], setup_s[name] = step, params, time.perf_counter() - start
    result["setup_s"] = setup_s
    want = params_of["eager"]()
    say(f"{config.name}: eager in float64 (3 steps): eager fp32's own rounding sets the tolerances")
    tol = tolerances(base, batches, want, initial)
    widened = {n: t for n, t in tol.items() if t > CHANGE_TOL}
    result["widened_tolerances"] = widened
    result["verify"] = verify(params_of, want, initial, tol)
    result["check_sensitivity"] = sensitivity(base, batches, want, initial, tol)
    if result["check_sensitivity"]["no clipping"]["change_rel_err"] == 0.0:
        result["notes"].append(
            "clipping never engaged in the 3 checked steps (every group's gradient norm < 1.0): "
            "the check cannot see a lost clip; the clipping work is still timed"
        )
    rounds, block = args.rounds or config.rounds, args.steps or config.block
    result.update(timed(config, "training", steps, args, rounds, block))
    return result


def verify(
    params_of: dict[str, Params], want: dict[str, torch.Tensor], initial, tol: dict[str, float]
) -> dict[str, dict[str, Any]]:
    checks = {}
    for name, read in params_of.items():
        got = read()
        checks[name] = judge(change_errors(got, want, initial), tol) | {
            "param_rel_err": relative_error(got, want)
        }
        c = checks[name]
        if not c["ok"]:
            say(
                f"  WRONG: {name} after 3 steps: {c['worst_tensor']} change error "
                f"{c['worst_tensor_err']:.1e} > tolerance {c['worst_tensor_tol']:.1e}"
            )
    say("verified: " + ", ".join(f"{n} {v['change_rel_err']:.1e}" for n, v in checks.items()))
    return checks


def sensitivity(base: nn.Module, batches, want, initial, tol: dict[str, float]) -> dict[str, dict]:
    """What the check can see: how it judges eager steps that drop weight decay or clipping.

    Adam normalizes the gradient, so neither moves the parameters much in 3 steps.
    """
    judged = {}
    for what, decays, clip in (
        ("no weight decay", (0.0, 0.0, 0.0), True),
        ("no clipping", GROUP_DECAY, False),
    ):
        model = copy.deepcopy(base)
        three_steps(eager_step(model, model, batches, decays, clip))
        judged[what] = judge(change_errors(host_params(model), want, initial), tol)
    say(
        "check sensitivity (eager with a mistake): "
        + ", ".join(f"{k} {v['change_rel_err']:.1e} ({caught(v)})" for k, v in judged.items())
    )
    return judged


def caught(judged: dict[str, Any]) -> str:
    return "not caught" if judged["ok"] else "caught"


def timed(
    config: Config, phase: str, steps: dict[str, Step], args: argparse.Namespace, rounds: int, block: int
) -> dict[str, Any]:
    return harness.timed(f"{config.name}: {phase}", steps, rounds, block, max(1, args.warmup))


# --- peak memory, in fresh processes ------------------------------------------------------------------


def memory_child(spec: dict[str, Any]) -> None:
    """In the fresh process: base RSS, set the variant up, steady-state peak of `steps` steps."""
    config = CONFIGS[spec["config"]]
    configure_dynamo()
    model, batches = config.build(spec["seed"]), config.batches(spec["seed"])
    settle()
    base = proc_status_kb("VmRSS")["VmRSS"]
    step, _ = make_variant(spec["variant"], model, config, batches, spec.get("form"))
    three_steps(step)
    settle()
    before = proc_status_kb("VmRSS")["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    for i in range(spec["steps"]):
        step(3 + i)
    peak = proc_status_kb("VmHWM")["VmHWM"]
    report = {
        "base_rss_mb": base / 1024,
        "peak_mb": (peak - base) / 1024,
        "step_mb": (peak - before) / 1024,
        "held_mb": (before - base) / 1024,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("MEMORY " + json.dumps(report), flush=True)


def measure_memory(config: Config, args: argparse.Namespace, form: str | None, names: list[str]) -> dict:
    results = {}
    for name in names:
        say(f"{config.name}: peak memory of {name} in a fresh process")
        spec = {
            "config": config.name,
            "variant": name,
            "form": form,
            "seed": args.seed,
            "steps": args.memory_steps,
        }
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
        if done.returncode != 0 or not lines:
            results[name] = {"error": done.stderr[-2000:]}
            say(f"  {name}: memory subprocess failed:\n{done.stderr[-2000:]}")
            continue
        results[name] = json.loads(lines[-1][len("MEMORY ") :])
    return results


# --- generation ----------------------------------------------------------------------------------------
def generation_inputs(ids: torch.Tensor) -> tuple:
    """The ids padded to GEN_LENGTH, their attention mask and positions, as the tutorial feeds them."""
    return gpt2_app.generation_inputs(ids, GEN_LENGTH, EOS)


@contextlib.contextmanager
def call_replaced(cls: type, function: Callable):
    """cls.__call__ = function for the block (HF's generate calls self(...)), then restored."""
    own = cls.__dict__.get("__call__")
    cls.__call__ = function
    try:
        yield
    finally:
        if own is None:
            del cls.__call__
        else:
            cls.__call__ = own


def generate_kwargs(prompt: torch.Tensor) -> dict[str, Any]:
    return {
        "attention_mask": torch.ones_like(prompt),
        "max_length": GEN_LENGTH,
        "do_sample": False,
        "use_cache": False,
        "pad_token_id": EOS,
    }


def ours_generator(model: GPT2LMHeadModel, prompt: torch.Tensor) -> Callable[[], torch.Tensor]:
    samba.from_torch_model_(model)
    with contextlib.redirect_stdout(sys.stderr):
        outputs = utils.trace_graph(model, generation_inputs(prompt), None, backend="inductor")
    run = samba.session.run

    def forward_on_device(self, *_, **kwargs):
        given = kwargs["input_ids"].shape[1]
        logits = run(
            generation_inputs(kwargs["input_ids"]), outputs, hyperparam_dict={"p": 0.0}, section_types=["fwd"]
        )[0]
        return CausalLMOutput(logits=logits[:, :given])

    def generate() -> torch.Tensor:
        with call_replaced(type(model), forward_on_device):
            return model.generate(prompt, **generate_kwargs(prompt))

    return generate


def generation_phase(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    base = config.build(args.seed).eval()
    prompt = torch.randint(VOCAB, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(args.seed + 2))
    eager_model = copy.deepcopy(base)
    generators = {"eager": lambda: eager_model.generate(prompt, **generate_kwargs(prompt))}
    say(f"{config.name}: generation: tracing and compiling ours (forward only, length {GEN_LENGTH})")
    start = time.perf_counter()
    generators["ours"] = ours_generator(copy.deepcopy(base), prompt)
    tokens = {"ours": generators["ours"]()}
    setup = time.perf_counter() - start  # trace, compile and the first generate call
    tokens["eager"] = generators["eager"]()
    same = tokens["ours"].tolist() == tokens["eager"].tolist()
    new_tokens = tokens["eager"].shape[1] - PROMPT_LENGTH
    if not same:
        say("  WRONG: ours generated other tokens than eager's generate")
    steps = {name: (lambda i, g=gen: g()) for name, gen in generators.items()}
    result = timed(config, "generation", steps, args, args.gen_rounds, 1)
    medians_s = {n: t["median_us"] / 1e6 for n, t in result["timing"].items()}
    result.update(
        new_tokens=new_tokens,
        tokens_per_s={n: new_tokens / s for n, s in medians_s.items()},
        identical_tokens=same,
        ours_setup_s=setup,
    )
    return result


# --- reporting -------------------------------------------------------------------------------------------
def add_ratios(train: dict[str, Any]) -> None:
    med = medians(train)
    good = {n for n, v in train["verify"].items() if v["ok"]}
    compiled = {n: t for n, t in med.items() if n in ("compile", "fullgraph") and n in good}
    best = min(compiled, key=compiled.get) if compiled else None
    train["best_torch_compile"] = best
    train["ratios"] = {
        "eager/ours": ratio(med.get("eager"), med.get("ours")),
        "best_torch_compile/ours": ratio(compiled.get(best), med.get("ours")) if best else None,
        "ours/floor": ratio(med.get("ours"), med.get("floor")),
    }


def print_training(entries: list[dict]) -> None:
    rows = [e for e in entries if "train" in e]
    if not rows:
        return
    print("\nGPT-2 TRAINING STEP: median ms per step (interleaved, one process); ratios > 1: ours faster")
    head = f"{'config':8}" + "".join(f"{c:>10}" for c in TRAIN_VARIANTS)
    print(head + f"{'eager/ours':>12}{'bestTC/ours':>12}{'ours/floor':>11}  {'bestTC':10}steps  check")
    for e in rows:
        t = e["train"]
        med, wrong = medians(t), [n for n, v in t["verify"].items() if not v["ok"]]
        cells = [
            fmt(med[c] / 1e3 if c in med else None, 1) + ("!" if c in wrong else "") for c in TRAIN_VARIANTS
        ]
        r = t["ratios"]
        line = f"{e['config']:8}" + "".join(f"{cell:>10}" for cell in cells)
        line += f"{fmt(r['eager/ours']):>12}{fmt(r['best_torch_compile/ours']):>12}{fmt(r['ours/floor']):>11}"
        n = t["timing"].get("ours", {}).get("n", 0)
        line += f"  {t['best_torch_compile'] or '-':10}{n:5d}  " + (
            "WRONG: " + ",".join(wrong) if wrong else "ok"
        )
        print(line)
    for e in rows:
        t = e["train"]
        form = t.get("fullgraph_form")
        if form:
            print(f"  {e['config']}: fullgraph ran form '{form}': {FULLGRAPH_DESCRIPTION[form]}")
        for note in t["notes"]:
            print(f"  {e['config']}: {note}")
        print_check(e["config"], t)
    print("  !: differs from eager (left out of bestTC); floor: the matrix products alone (mm/addmm/bmm)")


def print_check(config: str, t: dict[str, Any]) -> None:
    errors = ", ".join(
        f"{n} {v['change_rel_err']:.1e}"
        + (
            ""
            if v["ok_at_flat_2e-3"]
            else f" ({v['largest_tensor']}, tolerance {v['largest_tensor_tol']:.1e})"
        )
        for n, v in t["verify"].items()
    )
    print(f"  {config}: worst change error vs eager after 3 steps: {errors}")
    widened = t.get("widened_tolerances", {})
    if widened:
        top = sorted(widened.items(), key=lambda kv: -kv[1])[:3]
        print(
            f"  {config}: tolerance {CHANGE_TOL:.0e} per tensor, widened to {NOISE_FACTOR:g}x eager fp32's own "
            f"error vs float64 for {len(widened)}: " + ", ".join(f"{n} {v:.1e}" for n, v in top)
        )
    blind = ", ".join(
        f"{k} {v['change_rel_err']:.1e} ({caught(v)})" for k, v in t["check_sensitivity"].items()
    )
    print(f"  {config}: for scale, eager with a mistake: {blind}")


def print_memory(entries: list[dict]) -> None:
    rows = [e for e in entries if e.get("memory")]
    if not rows:
        return
    print("\nPEAK MEMORY of a training step (fresh process per variant), MiB beyond the built model")
    print(f"{'config':8}{'variant':>10}{'peak':>10}{'step':>10}{'held':>10}{'vs eager':>10}")
    for e in rows:
        eager = e["memory"].get("eager", {}).get("peak_mb")
        for name, m in e["memory"].items():
            if "error" in m:
                print(f"{e['config']:8}{name:>10}  FAILED (see stderr / JSON)")
                continue
            rel = fmt(ratio(m["peak_mb"], eager))
            print(
                f"{e['config']:8}{name:>10}{m['peak_mb']:10.0f}{m['step_mb']:10.0f}{m['held_mb']:10.0f}{rel:>10}"
            )
    print("  peak = VmHWM over steady steps - RSS after building the model; step = the transient part;")
    print("  held = kept between steps (optimizer state, gradients, compiled code, copies)")


def print_generation(entries: list[dict]) -> None:
    rows = [e for e in entries if "generate" in e]
    if not rows:
        return
    print(f"\nGREEDY GENERATION (max_length {GEN_LENGTH}, prompt {PROMPT_LENGTH}, no KV cache): new tokens/s")
    print(f"{'config':8}{'eager':>10}{'ours':>10}{'ours/eager':>12}{'calls':>7}  tokens")
    for e in rows:
        g = e["generate"]
        tps = g["tokens_per_s"]
        line = f"{e['config']:8}{tps['eager']:10.1f}{tps['ours']:10.1f}{fmt(ratio(tps['ours'], tps['eager'])):>12}"
        print(
            line
            + f"{g['timing']['ours']['n']:7d}  "
            + ("identical" if g["identical_tokens"] else "DIFFER (WRONG)")
        )


TARGETS = {"tiny": (1.5, 1.1), "small": (1.25, 1.02)}  # (eager/ours, best torch.compile/ours)
MEMORY_TARGET_CONFIGS = ("small",)


def check_targets(entries: list[dict]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(what: str, value: float | None, ok: bool) -> None:
        if value is not None:
            checks.append({"target": what, "value": value, "met": ok})

    for e in entries:
        name, r = e["config"], e.get("train", {}).get("ratios", {})
        eager_target, tc_target = TARGETS.get(name, (1.0, 1.0))
        v = r.get("eager/ours")
        add(f"{name} training: eager/ours >= {eager_target}", v, v is not None and v >= eager_target)
        v = r.get("best_torch_compile/ours")
        add(f"{name} training: best torch.compile/ours >= {tc_target}", v, v is not None and v >= tc_target)
        mem = e.get("memory", {})
        v = ratio(mem.get("ours", {}).get("peak_mb"), mem.get("eager", {}).get("peak_mb"))
        if name in MEMORY_TARGET_CONFIGS:
            add(f"{name} training: peak memory ours/eager <= 1.10", v, v is not None and v <= 1.10)
        g = e.get("generate")
        if g:
            v = ratio(g["tokens_per_s"]["ours"], g["tokens_per_s"]["eager"])
            add(
                f"{name} generation: ours/eager tokens/s >= 1.0",
                v,
                v is not None and v >= 1.0 and g["identical_tokens"],
            )
    return checks


def print_targets(checks: list[dict[str, Any]]) -> None:
    if checks:
        print("\nTARGETS")
        for c in checks:
            print(f"  {'met ' if c['met'] else 'MISS'}  {c['target']}: {c['value']:.3f}")


# --- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--quick", action="store_true", help="tiny only, few steps (smoke test)")
    parser.add_argument("--steps", type=int, help="steps per variant per round (default tiny 3, small 2)")
    parser.add_argument("--rounds", type=int, help="interleaving rounds (default tiny 10, small 5)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="warm-up steps per variant after the check (>= 1)"
    )
    parser.add_argument("--variants", default=",".join(TRAIN_VARIANTS), help="training variants to run")
    parser.add_argument(
        "--fullgraph-forms",
        default=",".join(FULLGRAPH_FORMS),
        help="fullgraph forms to try in order; the first that compiles is timed",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--memory-variants",
        default="eager,compile,fullgraph,ours",
        help="variants whose peak memory is measured",
    )
    parser.add_argument("--memory-steps", type=int, default=2, help="steps measured per memory subprocess")
    parser.add_argument("--no-generate", action="store_true", help="skip the generation measurement")
    parser.add_argument("--gen-rounds", type=int, default=5, help="timed generate calls per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--config-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.configs = "tiny"
        args.rounds, args.steps = args.rounds or 3, args.steps or 2
        args.gen_rounds = min(args.gen_rounds, 2)
        args.warmup = min(args.warmup, 1)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        parser.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.fullgraph_forms = [f.strip() for f in args.fullgraph_forms.split(",") if f.strip()]
    bad = [f for f in args.fullgraph_forms if f not in FULLGRAPH_FORMS]
    bad += [v for v in args.variants if v not in TRAIN_VARIANTS]
    if bad:
        parser.error(f"unknown variants/forms {bad}; variants {TRAIN_VARIANTS}, forms {FULLGRAPH_FORMS}")
    args.memory_variants = [v for v in args.memory_variants.split(",") if v in args.variants and v != "floor"]
    return args


def configure_dynamo() -> None:
    torch._dynamo.config.trace_autograd_ops = True  # lets the fullgraph step trace loss.backward()
    # every variant compiles GPT-2's forward again (other module): do not fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096
    )


def run_config(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    entry: dict[str, Any] = {"config": config.name, "shape": asdict(config)}
    entry["train"] = train_phase(config, args)
    add_ratios(entry["train"])
    torch._dynamo.reset()
    if not args.no_memory and args.memory_variants:
        entry["memory"] = measure_memory(
            config, args, entry["train"].get("fullgraph_form"), args.memory_variants
        )
    if config.name == "tiny" and not args.no_generate:
        entry["generate"] = generation_phase(config, args)
    return entry


def report(entries: list[dict], failed: list[str]) -> list[dict[str, Any]]:
    print_training(entries)
    print_memory(entries)
    print_generation(entries)
    targets = check_targets(entries)
    print_targets(targets)
    busy = [
        f"{e['config']} {p} {e[p]['other_cpu']:.0%}"
        for e in entries
        for p in ("train", "generate")
        if e.get(p, {}).get("other_cpu", 0.0) > OTHER_CPU_WARN
    ]
    if busy:
        print(
            f"\nWARNING: other processes used the CPUs while timing: {', '.join(busy)}; rerun on a quiet machine."
        )
    for name in failed:
        print(f"FAILED: {name} (see stderr / the JSON)")
    return targets


def config_child(name: str, args: argparse.Namespace) -> int:
    """In the config's fresh process: measure it, print its entry as one JSON line."""
    configure_dynamo()
    try:
        entry = run_config(CONFIGS[name], args)
    except Exception:
        say(f"{name} FAILED:\n{traceback.format_exc()}")
        entry = {"config": name, "error": traceback.format_exc()}
    print("ENTRY " + json.dumps(entry, default=str), flush=True)
    return 1 if "error" in entry else 0


def run_in_child(name: str, argv: list[str]) -> dict[str, Any]:
    """One config in a fresh process (its progress goes straight to our stderr)."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--config-child", name]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ENTRY ")]
    if not lines:
        return {"config": name, "error": f"its process exited with status {done.returncode} (stderr above)"}
    return json.loads(lines[-1][len("ENTRY ") :])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    if args.config_child:
        return config_child(args.config_child, args)
    say(
        f"configs {args.configs}; torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"
    )
    before = cpu_seconds()
    time.sleep(0.5)
    if other_cpu_share(before, cpu_seconds()) > 0.1:
        say("WARNING: other processes are using the CPUs now; timings will be noisy")
    started = time.time()
    entries, failed = [], []
    for name in args.configs:
        say(f"=== config {name} (in a fresh process)")
        entries.append(run_in_child(name, argv))
        if "error" in entries[-1]:
            failed.append(name)
    measured = [e for e in entries if "error" not in e]
    targets = report(measured, failed)
    if args.json:
        result = {
            "machine": machine(),
            "transformers": transformers.__version__,
            "args": {k: v for k, v in vars(args).items() if not k.endswith("_child")},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": time.time() - started,
            "adamw": {
                "lr": LR,
                "betas": BETAS,
                "eps": EPS,
                "weight_decay": GROUP_DECAY,
                "max_grad_norm": MAX_NORM,
            },
            "change_tolerance": CHANGE_TOL,
            "configs": entries,
            "targets": targets,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        say(f"wrote {args.json}")
    say(f"total {time.time() - started:.0f} s")
    ours_wrong = any(not e["train"]["verify"].get("ours", {"ok": True})["ok"] for e in measured)
    ours_wrong |= any(not e["generate"]["identical_tokens"] for e in measured if "generate" in e)
    return 1 if failed or ours_wrong else 0


if __name__ == "__main__":
    sys.exit(main())
