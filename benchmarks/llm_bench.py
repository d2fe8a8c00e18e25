"""LLM benchmark (issue 17): cached generation, bf16 mixed-precision training, peak memory.

    python benchmarks/llm_bench.py [--configs gpt2-small-like,llama-tiny] [--phases generate,train]
                                   [--new-tokens 32] [--json benchmarks/llm_results.json]
    python benchmarks/llm_bench.py --phases memory --configs llama-1b     # ~1.1 B parameters, minutes

generate  batch 1, greedy, a 16-token prompt, N new tokens, fp32 and bf16 weights. Variants, in one
          process, interleaved (benchmarks/harness.py): `ours` (the prompt and token programs of a
          KVCacheLM compiled by Inductor, sambaflow.samba.generation), `hf_eager` (Hugging Face
          `generate(use_cache=True)`, its DynamicCache), `hf_static_compile` (HF's static cache with
          `forward` under `torch.compile`, Llama only: GPT-2 has no static cache in transformers
          4.51.3). Before timing, every variant must produce the same tokens. Also printed: the
          fraction of the memory-bandwidth bound reached: weight bytes read per token against a
          measured copy bandwidth of this machine (the bound llama.cpp-style runtimes approach).
train     one AdamW step (two groups, clipped) on batch 4 x seq 128: `ours_fp32`, `ours_mp1`
          (`graphamp_preset='mp1'`: bf16 GEMMs, fp32 master weights and state), `eager_autocast`
          (`torch.autocast('cpu', torch.bfloat16)`), `eager_fp32`; plus the loss curve of 10 steps of
          ours_mp1 against eager autocast from the same weights and batches.
memory    peak RSS of training steps in fresh processes, ours (mp1) against eager autocast.

Results go to --json (default benchmarks/llm_results.json); RESULTS.md holds the analysis.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import transformers  # noqa: E402
from harness import (  # noqa: E402
    Target,
    fmt,
    machine,
    medians,
    print_targets,
    proc_status_kb,
    ratio,
    report_memory,
    reset_peak,
    run_memory_child,
    say,
    settle,
    timed,
)

import sambaflow.samba.utils as utils  # noqa: E402
from sambaflow import samba  # noqa: E402
from sambaflow.samba.generation import CachedGenerator, KVCacheLM, cached_graph_inputs  # noqa: E402

PROMPT = 16


@dataclass
class Config:
    name: str
    make: Callable[[], nn.Module]
    static_cache: bool  # HF supports cache_implementation="static" for it
    batch: int = 4
    seq: int = 128


def gpt2_small_like() -> nn.Module:
    # No dropout: the loss curves of ours and eager autocast are compared step by step, and dropout's
    # random masks differ between them (with 0.1 they drift 12% apart in 10 steps; with 0, 3e-5).
    config = transformers.GPT2Config(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> Callable:
    def make() -> nn.Module:
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)

    return make


CONFIGS = {
    "gpt2-small-like": Config("gpt2-small-like", gpt2_small_like, static_cache=False),
    "llama-tiny": Config("llama-tiny", llama(256, 688, 4, 8, 4, 32000), static_cache=True),
    "llama-1b": Config("llama-1b", llama(2048, 5632, 22, 32, 4, 32000), static_cache=True, batch=1),
}


def build(config: Config, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return config.make().to(dtype)


# --- generation ---------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Bytes per second that `copy_` moves (read plus write) between two 256 MiB buffers."""
    src, dst = torch.ones(64 * 2**20), torch.empty(64 * 2**20)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes_per_token(lm: nn.Module) -> int:
    """Bytes of weights one token reads: all but the input embedding tables (one row each), which
    count in full only where the output layer shares them."""
    output = lm.get_output_embeddings().weight
    tables = [m.weight for m in lm.modules() if isinstance(m, nn.Embedding) and m.weight is not output]
    skip = {id(t) for t in tables}
    return sum(p.numel() * p.element_size() for p in lm.parameters() if id(p) not in skip)


def generation_variants(config: Config, dtype: torch.dtype, new: int, seed: int) -> tuple[dict, dict]:
    """{variant: step} generating `new` tokens each call, and {variant: its tokens}."""
    lm = build(config, seed, dtype).eval()
    prompt = torch.randint(0, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
    samba.session.reset()
    cached = KVCacheLM(copy.deepcopy(lm), 1, PROMPT + new + 8)
    samba.from_torch_model_(cached)
    utils.trace_graph(cached, cached_graph_inputs(cached, PROMPT), backend="inductor")
    ours = CachedGenerator(cached)
    steps: dict[str, Callable] = {"ours": lambda _: ours.generate([prompt[0].tolist()], new)[0]}
    kwargs = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip

    def hf(model: nn.Module, **extra: Any) -> Callable:
        def step(_: int) -> list[int]:
            with torch.no_grad():
                return model.generate(prompt, **kwargs, **extra)[0, PROMPT:].tolist()

        return step

    steps["hf_eager"] = hf(lm, use_cache=True)
    if config.static_cache:
        compiled = copy.deepcopy(lm)
        compiled.forward = torch.compile(compiled.forward, fullgraph=True)
        steps["hf_static_compile"] = hf(compiled, cache_implementation="static")
    tokens = {name: step(0) for name, step in steps.items()}  # also compiles torch.compile's variant
    return steps, tokens | {"_weights": weight_bytes_per_token(lm)}


def generate_phase(config: Config, args: argparse.Namespace, bandwidth: float) -> dict[str, Any]:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        label = f"{config.name} generate {str(dtype).removeprefix('torch.')}"
        say(f"{label}: compiling and checking tokens")
        steps, tokens = generation_variants(config, dtype, args.new_tokens, args.seed)
        weights = tokens.pop("_weights")
        identical = all(t == tokens["hf_eager"] for t in tokens.values())
        agree = {n: _common_prefix(t, tokens["hf_eager"]) for n, t in tokens.items()}
        phase = timed(label, steps, rounds=args.rounds, block=1)
        per_s = {n: args.new_tokens / (m / 1e6) for n, m in medians(phase).items()}
        bound = bandwidth / weights
        results[str(dtype).removeprefix("torch.")] = phase | {
            "tokens_per_s": per_s,
            "identical_tokens": identical,
            "tokens_agreeing_with_hf_eager": agree,
            "weight_bytes_per_token": weights,
            "bandwidth_bound_tokens_per_s": bound,
            "bandwidth_fraction": {n: v / bound for n, v in per_s.items()},
        }
    return results


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share (bf16 rounding may part them after a while)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --- training -----------------------------------------------------------------------------------------
class LossHead(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids, labels):
        logits = self.lm(input_ids=ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), logits


def groups(model: nn.Module) -> list[list[nn.Parameter]]:
    decayed = [p for n, p in model.named_parameters() if p.dim() >= 2]
    return [decayed, [p for n, p in model.named_parameters() if p.dim() < 2]]


def batches(config: Config, seed: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed + 1)
    vocab = 32000 if "llama" in config.name else 50257
    made = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (config.batch, config.seq + 1), generator=generator)
        made.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return made


def eager_step(model: nn.Module, data: list, autocast: bool) -> Callable[[int], float]:
    optims = [torch.optim.AdamW(g, lr=1e-4, weight_decay=wd) for g, wd in zip(groups(model), (0.1, 0.0))]

    def step(i: int) -> float:
        ids, labels = data[i % len(data)]
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss, _ = model(ids, labels)
        for opt in optims:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for group, opt in zip(groups(model), optims):
            torch.nn.utils.clip_grad_norm_(group, 1.0)
            opt.step()
        return float(loss)

    return step


def ours_step(model: nn.Module, data: list, preset: str) -> Callable[[int], float]:
    samba.session.reset()
    samba.from_torch_model_(model)
    optims = [
        samba.optim.AdamW(g, lr=1e-4, betas=(0.9, 0.999), weight_decay=wd, max_grad_norm=1.0)
        for g, wd in zip(groups(model), (0.1, 0.0))
    ]
    named = [
        [samba.from_torch_tensor(t, name=n, batch_dim=0) for n, t in zip(("ids", "labels"), pair)]
        for pair in data
    ]
    outputs = utils.trace_graph(model, named[0], optims, backend="inductor", graphamp_preset=preset)

    def step(i: int) -> float:
        return float(samba.session.run(named[i % len(named)], outputs)[0])

    return step


def train_phase(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    data = batches(config, args.seed)
    base = LossHead(build(config, args.seed))
    curves = {}
    for name, make in (
        ("eager_autocast", lambda m: eager_step(m, data, True)),
        ("ours_mp1", lambda m: ours_step(m, data, "mp1")),
    ):
        step = make(copy.deepcopy(base))
        curves[name] = [step(i) for i in range(args.curve_steps)]
    drift = max(abs(a - b) / abs(b) for a, b in zip(curves["ours_mp1"], curves["eager_autocast"]))
    say(f"{config.name}: loss curves over {args.curve_steps} steps differ by at most {drift:.2e} (relative)")
    # ours_* last: each loads its graph into the one session, so only the last one loaded could run
    # interleaved. Two sessions cannot coexist, so ours_fp32 and ours_mp1 are timed in turn, each
    # interleaved with the eager variants.
    phases = {}
    for preset, name in (("mp0", "ours_fp32"), ("mp1", "ours_mp1")):
        steps = {
            "eager_autocast": eager_step(copy.deepcopy(base), data, True),
            "eager_fp32": eager_step(copy.deepcopy(base), data, False),
            name: ours_step(copy.deepcopy(base), data, preset),
        }
        phases[name] = timed(f"{config.name} train {name}", steps, rounds=args.rounds, block=1)
    times = {n: m for p in phases.values() for n, m in medians(p).items() if n.startswith("ours")}
    eager = {n: medians(phases["ours_mp1"])[n] for n in ("eager_autocast", "eager_fp32")}
    return {"phases": phases, "curves": curves, "curve_drift": drift, "median_us": times | eager}


# --- memory -------------------------------------------------------------------------------------------
def memory_child(spec: dict[str, Any]) -> None:
    config = CONFIGS[spec["config"]]
    data = batches(config, 0, count=1)
    settle()
    base = proc_status_kb("VmRSS")["VmRSS"]
    model = LossHead(build(config, 0))
    step = (
        eager_step(model, data, True)
        if spec["variant"] == "eager_autocast"
        else ours_step(model, data, "mp1")
    )
    step(0)
    settle()
    reset_peak()
    for i in range(spec["steps"]):
        step(1 + i)
    peak = proc_status_kb("VmHWM")["VmHWM"]
    report_memory({"peak_mb": (peak - base) / 1024, "params": sum(p.numel() for p in model.parameters())})


def memory_phase(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for variant in ("eager_autocast", "ours_mp1"):
        say(f"{config.name}: peak memory of {variant} in a fresh process")
        spec = json.dumps({"config": config.name, "variant": variant, "steps": args.memory_steps})
        results[variant] = run_memory_child([str(Path(__file__).resolve()), "--memory-child", spec])
    return results


# --- report -------------------------------------------------------------------------------------------
def print_report(entries: dict[str, dict[str, Any]]) -> list[Target]:
    targets: list[Target] = []
    for name, entry in entries.items():
        for dtype, g in entry.get("generate", {}).items():
            per_s = g["tokens_per_s"]
            agree = g["tokens_agreeing_with_hf_eager"]
            same = "same tokens" if g["identical_tokens"] else f"leading tokens equal to hf_eager's: {agree}"
            print(f"\n{name} generation, {dtype}, batch 1 ({same})")
            if dtype == "float32" and not g["identical_tokens"]:
                print("  WRONG: fp32 greedy tokens differ from Hugging Face's")
            for variant, value in per_s.items():
                fraction = g["bandwidth_fraction"][variant]
                print(f"  {variant:18s} {value:8.1f} new tokens/s   {fraction:6.1%} of the bandwidth bound")
            print(
                f"  bound: {g['bandwidth_bound_tokens_per_s']:.1f} tokens/s ({g['weight_bytes_per_token'] / 2**20:.0f} MiB a token)"
            )
            targets.append(
                Target(
                    f"{name} {dtype} generation ours/hf_eager", ratio(per_s["ours"], per_s["hf_eager"]), 1.5
                )
            )
            if "hf_static_compile" in per_s:
                value = ratio(per_s["ours"], per_s["hf_static_compile"])
                targets.append(Target(f"{name} {dtype} generation ours/hf_static_compile", value, 1.0))
        train = entry.get("train")
        if train:
            t = train["median_us"]
            print(
                f"\n{name} training step (median ms): "
                + ", ".join(f"{n} {v / 1e3:.1f}" for n, v in t.items())
            )
            print(
                f"  loss curve ours_mp1 vs eager_autocast: max relative difference {train['curve_drift']:.2e}"
            )
            targets.append(
                Target(f"{name} train ours_fp32/ours_mp1", ratio(t["ours_fp32"], t["ours_mp1"]), 1.5)
            )
            targets.append(
                Target(
                    f"{name} train eager_autocast/ours_mp1", ratio(t["eager_autocast"], t["ours_mp1"]), 1.1
                )
            )
        memory = entry.get("memory")
        if memory:
            ours, eager = memory["ours_mp1"].get("peak_mb"), memory["eager_autocast"].get("peak_mb")
            print(
                f"\n{name} peak memory of training steps: ours {fmt(ours, 0)} MiB, eager autocast {fmt(eager, 0)} MiB"
            )
            targets.append(
                Target(f"{name} train peak memory ours/eager", ratio(ours, eager), 1.0, at_most=True)
            )
    print_targets(targets)
    return targets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="gpt2-small-like,llama-tiny", help=f"of {list(CONFIGS)}")
    parser.add_argument("--phases", default="generate,train", help="generate, train, memory")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--curve-steps", type=int, default=10)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(HERE / "llm_results.json"))
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    phases = args.phases.split(",")
    bandwidth = copy_bandwidth()
    say(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    entries: dict[str, dict[str, Any]] = {}
    for name in args.configs.split(","):
        config, entry = CONFIGS[name], {}
        if "generate" in phases:
            entry["generate"] = generate_phase(config, args, bandwidth)
        if "train" in phases:
            entry["train"] = train_phase(config, args)
        if "memory" in phases:
            entry["memory"] = memory_phase(config, args)
        entries[name] = entry
    targets = print_report(entries)
    result = {"machine": machine(), "copy_bandwidth": bandwidth, "configs": entries}
    result["targets"] = [t.as_dict() for t in targets]
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
