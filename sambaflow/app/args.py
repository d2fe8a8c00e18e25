"""Command-line arguments of a SambaFlow app: `parse_app_args`, `parse_yaml_to_args`.

Each sub-command (`compile`, `run`, `test`, `measure-performance`, `measure-sections`) lists and
accepts the standard arguments that act on it (`COMMAND_OPTIONS`: compile-only options are not
under `run`), and its namespace holds every standard argument's default, so app code may read any
`args.<name>` under any command. App hooks add their own; an app may redefine a standard option
(say its own `-b/--batch-size`) and its definition, default included, wins instead of a conflict.

`parse_app_args` also applies `--num-threads` (before anything compiles or loads) and installs
the hook that ends the app on a `SambaError` with a one-line `error:` (app/error_hook.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from sambaflow.app import error_hook
from sambaflow.errors import SambaArgumentError
from sambaflow.logging import set_log_level

COMMAND_HELP = {
    "compile": "trace the model, loss and optimizer into one graph and write a PEF",
    "run": "run the app's training or inference loop on a compiled PEF",
    "test": "compare the compiled graph against plain PyTorch on the CPU",
    "measure-performance": "time repeated whole-step runs",
    "measure-sections": "time each section of the graph",
}
COMMANDS = tuple(COMMAND_HELP)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
BACKENDS = ("reference", "inductor")

ParserHook = Callable[[argparse.ArgumentParser], Any]

MEASURE = ("measure-performance", "measure-sections")
# dest -> the commands that list and accept the option; every other standard option is on every
# command. The others still get its default in their namespace.
COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {
    "output_folder": ("compile",),
    "pef_name": ("compile",),
    "backend": ("compile", "run"),
    "mapping": ("compile",),
    "num_tiles": ("compile",),
    "o0": ("compile",),
    "o1": ("compile",),
    "arch": ("compile",),
    "resources_scaling_factors": ("compile",),
    "world_size": ("compile",),
    "n_chips": ("compile", "run", *MEASURE),
    "num_threads": ("compile", "run", *MEASURE),
    "num_iterations": MEASURE,
    "run_graph_only": ("measure-performance",),
    "min_duration": ("measure-performance",),
    "json": MEASURE,
}

# Arguments this project accepts (so real apps and scripts run unchanged) but does not act on yet.
# dest -> (option as the user writes it, standard default, why it has no effect). Shrink this as
# features land; `ineffective_arguments` reads nothing else.
INEFFECTIVE_ARGUMENTS: dict[str, tuple[str, Any, str]] = {
    "n_chips": ("--n-chips", 1, "device resources are not modelled"),
    "num_tiles": ("--num-tiles", 4, "device resources are not modelled"),
    "o0": ("--o0", False, "there are no RDU compiler optimisation levels"),
    "o1": ("--o1", False, "there are no RDU compiler optimisation levels"),
    "arch": ("--arch", None, "the target is the backend's device (CPU, or CUDA where compiled for it)"),
    "resources_scaling_factors": (
        "--resources-scaling-factors",
        None,
        "device resources are not modelled",
    ),
    "mapping": ("--mapping", "section", "only section mapping is implemented"),
    "enable_mixed_precision_ops": (
        "--enable-mixed-precision-ops",
        None,
        "on the CPU, bf16 matrix products already accumulate in fp32 and bf16 softmax computes in fp32",
    ),
}


# ---------------------------------------------------------------------------- value types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a float >= 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def thread_count(text: str) -> int:
    """argparse type for --num-threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number of CPU threads >= 1, got {text!r} (e.g. --num-threads 1 on a busy machine)"
        )
    return value


def _lower(text: str) -> str:
    return text.lower()


def _env_local_rank() -> int:
    """LOCAL_RANK from the environment (set by torchrun), else -1."""
    text = os.environ.get("LOCAL_RANK", "").strip()
    if not text:
        return -1
    try:
        return int(text)
    except ValueError:
        raise SambaArgumentError(
            f"environment variable LOCAL_RANK={text!r} is not an integer: unset it or let torchrun set it"
        ) from None


# ---------------------------------------------------------------------------- standard arguments


def _add(group: Any, *flags: str, **kwargs: Any) -> None:
    """add_argument, marking the help of arguments listed in INEFFECTIVE_ARGUMENTS."""
    action = group.add_argument(*flags, **kwargs)
    if action.dest in INEFFECTIVE_ARGUMENTS:
        action.help = f"{action.help} (accepted, no effect yet)"


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("graph shape")
    _add(g, "-b", "--batch-size", type=positive_int, default=1, help="compiled per-replica batch size")
    _add(
        g, "-mb", "--microbatch-size", type=positive_int, default=None, help="micro-batch size inside a batch"
    )
    _add(
        g,
        "--grad-accumulation-steps",
        type=positive_int,
        default=1,
        help="batches accumulated before an optimizer update",
    )
    _add(g, "--inference", action="store_true", help="forward-only graph, no optimizer")


def _add_pef_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PEF")
    _add(
        g, "-p", "--pef", type=str, default=None, help="PEF to run; for compile, the path to write the PEF to"
    )
    _add(g, "--output-folder", type=str, default="out", help="where compile writes (default: out)")
    _add(g, "--pef-name", type=str, default=None, help="PEF name (default: generated)")
    _add(
        g,
        "--sign-key",
        type=str,
        default=None,
        metavar="FILE",
        help="compile: sign the PEF with this key; run: load only PEFs signed with it "
        "(default: $SAMBAFLOW_SIGN_KEY; the file holds >= 32 random bytes, mode 0600)",
    )


def _add_compiler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compiler")
    _add(
        g,
        "--backend",
        choices=BACKENDS,
        default=None,
        help="how sections are compiled: inductor (C++/Triton) or reference (eager ATen); "
        "default: $SAMBAFLOW_BACKEND, else inductor (reference where Inductor cannot run). "
        "run: used without -p only (a PEF fixes its backend)",
    )
    _add(
        g,
        "--graphamp-preset",
        type=_lower,
        choices=("mp0", "mp1", "mp4"),
        default=None,
        help="GraphAMP mixed precision: mp0 off (default); mp1 bf16 mixed precision (GEMM-like ops "
        "in bf16 under autocast, fp32 weights, gradients and optimizer state); mp4 is refused. "
        "A PEF keeps the one it was compiled with",
    )
    _add(
        g,
        "--enable-mixed-precision-ops",
        nargs="+",
        choices=("gemm", "softmax"),
        default=None,
        help="ops computed in bf16 with fp32 accumulation (the CPU's bf16 GEMMs and softmax "
        "already accumulate in fp32)",
    )
    _add(g, "--mapping", choices=("section", "spatial"), default="section", help="mapping mode")
    _add(g, "--n-chips", type=positive_int, default=1, help="device chips")
    _add(g, "--num-tiles", type=positive_int, default=4, help="device tiles")
    _add(g, "--o0", action="store_true", help="compiler optimisation level 0")
    _add(g, "--o1", action="store_true", help="compiler optimisation level 1")
    _add(g, "--arch", type=str, default=None, help="RDU architecture, e.g. sn20 or sn30")
    _add(
        g,
        "--resources-scaling-factors",
        type=float,
        nargs="+",
        default=None,
        help="per-resource scaling of the compiler's estimates, e.g. 0.8 0.8 0.8",
    )
    _add(g, "--seed", type=int, default=0, help="random seed (default: 0)")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data parallel")
    _add(
        g,
        "--data-parallel",
        action="store_true",
        help="compile: a PEF for data-parallel runs; run: one replica of those torchrun or "
        "mpirun started, gradients averaged over all of them (torch.distributed)",
    )
    _add(
        g,
        "-ws",
        "--world-size",
        type=positive_int,
        default=1,
        help="replicas the PEF is meant for (recorded; one PEF runs on any number)",
    )
    _add(
        g,
        "--reduce-on-rdu",
        action="store_true",
        help="average gradients over the replicas (as --data-parallel; torch.distributed here)",
    )
    _add(
        g,
        "--local-rank",
        "--local_rank",
        dest="local_rank",
        type=int,
        default=argparse.SUPPRESS,
        help="this process's local rank (default: $LOCAL_RANK, else -1)",
    )


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    _add(
        g,
        "-n",
        "--num-iterations",
        type=positive_int,
        default=100,
        help="timed iterations for measure-performance / measure-sections",
    )
    _add(g, "--run-graph-only", action="store_true", help="time graph runs only, no host transfers")
    _add(
        g,
        "--min-duration",
        type=non_negative_float,
        default=None,
        help="keep timing until at least this many seconds have passed",
    )
    _add(g, "--json", type=str, default=None, help="write measurements to this JSON file")


def _add_thread_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CPU threads")
    _add(
        g,
        "--num-threads",
        type=thread_count,
        default=None,
        metavar="N",
        help="CPU threads for compiled code and torch ops (torch.set_num_threads, before anything "
        "compiles or loads); default: torch's choice (OMP_NUM_THREADS, else one per core). "
        "Lower it when other processes share the CPUs (see README)",
    )


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    _add(g, "--log-level", type=_lower, choices=LOG_LEVELS, default="warning", help="log level")
    _add(g, "--log-dir", type=str, default=None, help="directory for log files")
    _add(g, "--debug", action="store_true", help="debug output")
    _add(g, "--verbose", action="store_true", help="verbose output")


def add_standard_args(parser: argparse.ArgumentParser) -> None:
    """Add every standard SambaFlow argument to one sub-command's parser."""
    for add in (
        _add_shape_args,
        _add_pef_args,
        _add_compiler_args,
        _add_parallel_args,
        _add_measure_args,
        _add_thread_args,
        _add_logging_args,
    ):
        add(parser)


def keep_own_options(parser: argparse.ArgumentParser, command: str) -> dict[str, Any]:
    """Remove the standard options that do not act on `command`; return their defaults by dest."""
    hidden = {}
    for action in list(parser._actions):
        commands = COMMAND_OPTIONS.get(action.dest)
        if commands is None or command in commands:
            continue
        hidden[action.dest] = action.default
        action.container._remove_action(action)
        for flag in action.option_strings:
            parser._option_string_actions.pop(flag, None)
    return hidden


# ---------------------------------------------------------------------------- building the parser


def _apply_app_defaults(parser: argparse.ArgumentParser, ours: set[argparse.Action]) -> None:
    """Make the app's default win where an app option shares a dest with a standard one.

    argparse's 'resolve' handler drops our option strings the app redefined, but a standard action
    that kept some strings (the app defined `--batch-size` only, say) would still set its default
    first; give it the app's default.
    """
    app_defaults = {
        a.dest: a.default
        for a in parser._actions
        if a not in ours and a.dest != argparse.SUPPRESS and a.default is not argparse.SUPPRESS
    }
    shared = {a.dest for a in parser._actions if a in ours} & app_defaults.keys()
    if shared:
        parser.set_defaults(**{dest: app_defaults[dest] for dest in shared})


def _run_hook(hook: ParserHook | None, parser: argparse.ArgumentParser, label: str) -> None:
    if hook is None:
        return
    if not callable(hook):
        raise SambaArgumentError(
            f"parse_app_args({label}=...) got {type(hook).__name__}, not a function: pass a function "
            "that takes the sub-command's argparse parser and adds arguments to it"
        )
    hook(parser)


def _build_command_parser(subparsers: Any, command: str, hooks: dict[str, ParserHook | None]) -> None:
    parser = subparsers.add_parser(command, conflict_handler="resolve", help=COMMAND_HELP[command])
    add_standard_args(parser)
    hidden = keep_own_options(parser, command)
    ours = set(parser._actions)
    _run_hook(hooks["common_parser_fn"], parser, "common_parser_fn")
    if command == "run":
        _run_hook(hooks["run_parser_fn"], parser, "run_parser_fn")
    if command == "test":
        _run_hook(hooks["test_parser_fn"], parser, "test_parser_fn")
    _apply_app_defaults(parser, ours)
    defined = {action.dest for action in parser._actions}
    parser.set_defaults(**{dest: value for dest, value in hidden.items() if dest not in defined})


def build_parser(
    common_parser_fn: ParserHook | None = None,
    test_parser_fn: ParserHook | None = None,
    run_parser_fn: ParserHook | None = None,
) -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command, app hooks applied."""
    parser = argparse.ArgumentParser(description="A SambaFlow app (sambaflow-open).")
    parser.add_argument(
        "--local-rank",
        "--local_rank",
        dest="local_rank",
        type=int,
        default=None,
        help="this process's local rank (default: $LOCAL_RANK, else -1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    hooks = {
        "common_parser_fn": common_parser_fn,
        "test_parser_fn": test_parser_fn,
        "run_parser_fn": run_parser_fn,
    }
    for command in COMMANDS:
        _build_command_parser(subparsers, command, hooks)
    return parser


def parse_app_args(
    argv: Sequence[str] | None = None,
    common_parser_fn: ParserHook | None = None,
    test_parser_fn: ParserHook | None = None,
    run_parser_fn: ParserHook | None = None,
    dev_mode: bool = False,
) -> argparse.Namespace:
    """Parse an app's command line (`argv=None`: `sys.argv[1:]`) into a namespace.

    `common_parser_fn(parser)` runs on every sub-command's parser, `run_parser_fn` on `run`'s and
    `test_parser_fn` on `test`'s. `dev_mode` is accepted for compatibility and recorded as
    `args.dev_mode`; it changes nothing. Installs the one-line `SambaError` report
    (app/error_hook.py) and applies `--num-threads`.
    """
    error_hook.install()
    parser = build_parser(common_parser_fn, test_parser_fn, run_parser_fn)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.local_rank is None:
        args.local_rank = _env_local_rank()
    args.dev_mode = bool(dev_mode)
    set_log_level(args.log_level)
    apply_num_threads(getattr(args, "num_threads", None))
    join_replicas(args)
    global _last_parsed
    _last_parsed = args
    return args


_last_parsed: argparse.Namespace | None = None


def apply_num_threads(count: int | None) -> None:
    """`torch.set_num_threads(count)` (None: leave torch's choice). Inductor's compiled loops follow
    it at run time unless they were compiled for a count other than the machine's CPU count."""
    if count is not None:
        import torch

        torch.set_num_threads(count)


REPLICA_COMMANDS = ("run", *MEASURE)


def join_replicas(args: argparse.Namespace) -> None:
    """`run` / `measure-*` with --data-parallel (or --reduce-on-rdu): join the replicas the
    launcher started (torchrun, mpirun) now, as SambaFlow's runtime does, so the app's own
    `dist.is_initialized()` / `dist.get_rank()` (data sharding, printing on rank 0) see them.
    `args.world_size` becomes the number of replicas, `args.local_rank` mpirun's local rank."""
    if getattr(args, "command", None) not in REPLICA_COMMANDS:
        return
    if not (getattr(args, "data_parallel", False) or getattr(args, "reduce_on_rdu", False)):
        return
    from sambaflow.runtime import communicator, launch_env

    comm = communicator.current()
    args.world_size = comm.world_size
    if args.local_rank == -1 and comm.world_size > 1:
        args.local_rank = launch_env.detect().local_rank


def parsed_args() -> argparse.Namespace | None:
    """What the last `parse_app_args` returned in this process (`session.compile` reads it when
    the app passes no `config_dict`, as SambaFlow's tutorials do)."""
    return _last_parsed


# ---------------------------------------------------------------------------- after parsing


def _describe(flag: str, value: Any) -> str:
    return flag if value is True else f"{flag} {value}"


def ineffective_arguments(args: argparse.Namespace) -> list[str]:
    """One line per argument given a non-default value that this project accepts but ignores."""
    lines = []
    for dest, (flag, default, why) in INEFFECTIVE_ARGUMENTS.items():
        value = getattr(args, dest, default)
        if value != default:
            lines.append(f"{_describe(flag, value)}: accepted but had no effect ({why})")
    if getattr(args, "inference", False):
        for flag, dest, default in (
            ("-mb/--microbatch-size", "microbatch_size", None),
            ("--grad-accumulation-steps", "grad_accumulation_steps", 1),
        ):
            value = getattr(args, dest, default)
            if value != default:
                why = "an inference graph has no gradients to accumulate"
                lines.append(f"{_describe(flag, value)}: accepted but had no effect ({why})")
    return lines


def _read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise SambaArgumentError(
            f"YAML file {os.fspath(path)!r} given to parse_yaml_to_args does not exist: "
            "check the path (it is relative to the current directory)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SambaArgumentError(f"could not read YAML file {os.fspath(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        raise SambaArgumentError(f"YAML file {os.fspath(path)!r} is not valid YAML: {e}") from None


def parse_yaml_to_args(path: str | os.PathLike[str], args: argparse.Namespace) -> argparse.Namespace:
    """Overlay a YAML file's top-level keys onto `args` (in place; also returned).

    Keys with dashes map to underscores (`batch-size` -> `args.batch_size`). An empty file changes
    nothing.
    """
    data = _read_yaml(path)
    if data is None:
        return args
    if not isinstance(data, dict):
        raise SambaArgumentError(
            f"YAML file {os.fspath(path)!r} holds a {type(data).__name__}, not a mapping: write it "
            "as `key: value` lines, e.g. `batch-size: 64`"
        )
    for key, value in data.items():
        if not isinstance(key, str):
            raise SambaArgumentError(
                f"YAML file {os.fspath(path)!r} has the non-text key {key!r}: argument names must be text"
            )
        setattr(args, key.replace("-", "_"), value)
    return args
