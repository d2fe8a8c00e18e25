"""parse_app_args, parse_yaml_to_args, ineffective_arguments: CLI tests that run nothing."""

import argparse

import pytest

from sambaflow.app.args import COMMANDS, INEFFECTIVE_ARGUMENTS, ineffective_arguments, parse_app_args
from sambaflow.errors import SambaArgumentError
from sambaflow.samba.utils import argparser

STANDARD_DEFAULTS = {
    "batch_size": 1,
    "microbatch_size": None,
    "grad_accumulation_steps": 1,
    "inference": False,
    "pef": None,
    "output_folder": "out",
    "pef_name": None,
    "mapping": "section",
    "n_chips": 1,
    "num_tiles": 4,
    "o0": False,
    "o1": False,
    "data_parallel": False,
    "world_size": 1,
    "reduce_on_rdu": False,
    "num_iterations": 100,
    "run_graph_only": False,
    "min_duration": None,
    "json": None,
    "log_level": "warning",
    "log_dir": None,
    "debug": False,
    "verbose": False,
    "backend": None,
    "seed": 0,
    "num_threads": None,
}


@pytest.fixture(autouse=True)
def _no_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_public_import_path_is_the_same_function():
    assert argparser.parse_app_args is parse_app_args
    assert set(argparser.__all__) == {"parse_app_args", "parse_yaml_to_args", "positive_int"}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_every_standard_default(command):
    args = parse_app_args([command])
    assert args.command == command
    for dest, default in STANDARD_DEFAULTS.items():
        assert getattr(args, dest) == default, dest
    assert args.local_rank == -1
    assert args.dev_mode is False


def test_commands_keep_their_dash():
    assert COMMANDS == ("compile", "run", "test", "measure-performance", "measure-sections")


def test_seed_compile_example():
    args = parse_app_args(["compile", "-b=64", "-mb=4", "--inference", "-p", "app.pef"])
    assert args.command == "compile"
    assert args.batch_size == 64
    assert args.microbatch_size == 4
    assert args.inference is True
    assert args.pef == "app.pef"


def test_seed_run_example_with_long_names():
    argv = ["run", "--batch-size", "64", "--microbatch-size=4", "--inference", "--pef", "x.pef"]
    args = parse_app_args(argv)
    assert (args.command, args.batch_size, args.microbatch_size) == ("run", 64, 4)
    assert args.inference is True and args.pef == "x.pef"


def test_every_standard_value_parses():
    compile_only = [
        "compile", "-b", "8", "--grad-accumulation-steps", "2", "--output-folder", "o",
        "--pef-name", "n", "--mapping", "spatial", "--n-chips", "2", "--num-tiles", "8", "--o0", "--o1",
        "--data-parallel", "-ws", "4", "--reduce-on-rdu", "--log-level", "INFO", "--log-dir", "logs",
        "--debug", "--verbose", "--backend", "reference", "--seed", "3",
    ]  # fmt: skip
    args = parse_app_args(compile_only)
    got = {d: getattr(args, d) for d in STANDARD_DEFAULTS}
    assert got == {
        **STANDARD_DEFAULTS, "batch_size": 8, "grad_accumulation_steps": 2, "output_folder": "o",
        "pef_name": "n", "mapping": "spatial", "n_chips": 2, "num_tiles": 8, "o0": True, "o1": True,
        "data_parallel": True, "world_size": 4, "reduce_on_rdu": True, "log_level": "info",
        "log_dir": "logs", "debug": True, "verbose": True, "backend": "reference", "seed": 3,
    }  # fmt: skip
    measure = [
        "measure-performance",
        "-n",
        "7",
        "--run-graph-only",
        "--min-duration",
        "1.5",
        "--json",
        "r.json",
    ]
    args = parse_app_args(measure)
    got = {d: getattr(args, d) for d in STANDARD_DEFAULTS}
    assert got == {
        **STANDARD_DEFAULTS, "num_iterations": 7, "run_graph_only": True, "min_duration": 1.5, "json": "r.json"
    }  # fmt: skip


def test_argv_none_reads_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["app.py", "test", "-b", "5"])
    args = parse_app_args()
    assert (args.command, args.batch_size) == ("test", 5)


@pytest.mark.parametrize(
    "argv",
    [[], ["train"], ["run", "--no-such-flag"], ["run", "-b", "0"], ["run", "-b", "x"],
     ["run", "--backend", "tpu"], ["run", "--mapping", "diagonal"], ["run", "--min-duration", "-1"]],
)  # fmt: skip
def test_bad_command_lines_exit_with_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_app_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_batch_size_message_names_the_argument(capsys):
    with pytest.raises(SystemExit):
        parse_app_args(["compile", "-b", "-3"])
    err = capsys.readouterr().err
    assert "-b/--batch-size" in err and "positive integer" in err


def test_local_rank_from_env_and_flags(monkeypatch):
    assert parse_app_args(["run", "--local_rank", "2"]).local_rank == 2
    assert parse_app_args(["run", "--local-rank=5"]).local_rank == 5
    # torch.distributed.launch puts the flag before the sub-command
    assert parse_app_args(["--local-rank=3", "run"]).local_rank == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parse_app_args(["run"]).local_rank == 1
    assert parse_app_args(["run", "--local-rank", "0"]).local_rank == 0


def test_bad_local_rank_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "zero")
    with pytest.raises(SambaArgumentError, match="LOCAL_RANK"):
        parse_app_args(["run"])


def test_dev_mode_is_recorded():
    assert parse_app_args(["run"], dev_mode=True).dev_mode is True


# ---------------------------------------------------------------------------- app hooks


def add_common(parser):
    parser.add_argument("--lr", type=float, default=0.0015)
    parser.add_argument("--num-features", type=int, default=784)
    parser.add_argument("-e", "--num-epochs", type=int, default=1)


def add_run(parser):
    parser.add_argument("--data-dir", type=str, default="mnist_data")


def add_test(parser):
    parser.add_argument("--threshold", type=float, default=0.01)


@pytest.mark.parametrize("command", COMMANDS)
def test_common_hook_runs_on_every_command(command):
    args = parse_app_args([command, "--lr", "0.1"], common_parser_fn=add_common)
    assert args.lr == 0.1
    assert args.num_features == 784
    assert args.num_epochs == 1
    assert args.batch_size == 1


def test_run_and_test_hooks_only_on_their_command(capsys):
    kw = {"common_parser_fn": add_common, "run_parser_fn": add_run, "test_parser_fn": add_test}
    run = parse_app_args(["run", "--data-dir", "d", "--num-features", "64"], **kw)
    assert (run.data_dir, run.num_features) == ("d", 64)
    assert not hasattr(run, "threshold")
    test = parse_app_args(["test", "--threshold", "0.5"], **kw)
    assert test.threshold == 0.5 and not hasattr(test, "data_dir")
    compile_args = parse_app_args(["compile"], **kw)
    assert not hasattr(compile_args, "data_dir") and not hasattr(compile_args, "threshold")
    with pytest.raises(SystemExit):
        parse_app_args(["compile", "--data-dir", "d"], **kw)


def test_app_redefines_batch_size_without_conflict():
    def hook(parser):
        parser.add_argument("-b", "--batch-size", type=int, default=32, help="the app's own")

    assert parse_app_args(["compile"], common_parser_fn=hook).batch_size == 32
    assert parse_app_args(["run", "-b", "16"], common_parser_fn=hook).batch_size == 16
    assert parse_app_args(["run", "--batch-size", "8"], common_parser_fn=hook).batch_size == 8
    # the app's type wins too: the standard one refuses 0
    assert parse_app_args(["run", "-b", "0"], common_parser_fn=hook).batch_size == 0


def test_app_redefines_only_the_long_option():
    def hook(parser):
        parser.add_argument("--batch-size", type=int, default=48)

    assert parse_app_args(["test"], common_parser_fn=hook).batch_size == 48
    assert parse_app_args(["test", "--batch-size", "2"], common_parser_fn=hook).batch_size == 2
    assert parse_app_args(["test", "-b", "3"], common_parser_fn=hook).batch_size == 3


def test_app_redefines_in_an_argument_group_and_in_the_run_hook():
    def common(parser):
        parser.add_argument_group("app").add_argument("-n", "--num-iterations", type=int, default=5)

    def run(parser):
        parser.add_argument("--inference", action="store_true", default=True)

    assert parse_app_args(["measure-performance"], common_parser_fn=common).num_iterations == 5
    args = parse_app_args(["run"], common_parser_fn=common, run_parser_fn=run)
    assert args.inference is True and args.num_iterations == 5
    assert parse_app_args(["compile"], run_parser_fn=run).inference is False


def test_hook_that_is_not_callable_is_a_clear_error():
    with pytest.raises(SambaArgumentError, match="common_parser_fn"):
        parse_app_args(["run"], common_parser_fn="add_args")


# ---------------------------------------------------------------------------- ineffective arguments


@pytest.mark.parametrize("command", COMMANDS)
def test_no_ineffective_arguments_by_default(command):
    assert ineffective_arguments(parse_app_args([command])) == []


def test_ineffective_arguments_lists_n_chips_and_mb_only_for_inference():
    training = ineffective_arguments(parse_app_args(["compile", "-b", "64", "-mb", "4", "--n-chips", "2"]))
    assert len(training) == 1 and "--n-chips 2" in training[0] and "no effect" in training[0]
    argv = ["compile", "-b", "64", "-mb", "4", "--grad-accumulation-steps", "2", "--inference"]
    inference = ineffective_arguments(parse_app_args(argv))
    assert len(inference) == 2 and all("inference graph" in line for line in inference)


def test_ineffective_arguments_covers_every_listed_argument():
    argv = ["compile", "--n-chips", "2", "--num-tiles", "8", "--o0", "--o1", "--mapping", "spatial",
            "--reduce-on-rdu", "--grad-accumulation-steps", "3", "-mb", "2", "--data-parallel", "-ws", "2",
            "--arch", "sn20", "--resources-scaling-factors", "0.8", "0.8", "0.8",
            "--enable-mixed-precision-ops", "gemm"]  # fmt: skip
    lines = ineffective_arguments(parse_app_args(argv))
    assert len(lines) == len(INEFFECTIVE_ARGUMENTS)  # -mb and accumulation act on a training compile
    assert not any("--microbatch-size" in line or "--grad-accumulation" in line for line in lines)
    assert any(line.startswith("--resources-scaling-factors [0.8, 0.8, 0.8]:") for line in lines)
    assert any(line.startswith("--mapping spatial") for line in lines)
    assert any(line.startswith("--o0:") for line in lines)
    assert all("no effect" in line for line in lines)


def test_ineffective_arguments_ignores_missing_attributes():
    assert ineffective_arguments(argparse.Namespace(batch_size=3)) == []


# ---------------------------------------------------------------------------- yaml


def test_yaml_overlay(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("batch-size: 64\nlr: 0.5\nnested:\n  a: 1\nnum_features: 10\n")
    args = parse_app_args(["run"])
    out = argparser.parse_yaml_to_args(str(path), args)
    assert out is args
    assert (args.batch_size, args.lr, args.nested, args.num_features) == (64, 0.5, {"a": 1}, 10)
    assert args.command == "run" and args.num_iterations == 100


def test_yaml_empty_file_changes_nothing(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    args = parse_app_args(["run"])
    assert vars(argparser.parse_yaml_to_args(path, args)) == vars(parse_app_args(["run"]))


def test_yaml_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SambaArgumentError, match="nope.yaml.*does not exist"):
        argparser.parse_yaml_to_args(str(path), parse_app_args(["run"]))


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n", "3\n"])
def test_yaml_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(SambaArgumentError, match="list.yaml.*not a mapping"):
        argparser.parse_yaml_to_args(str(path), parse_app_args(["run"]))


def test_yaml_invalid_syntax(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(SambaArgumentError, match="bad.yaml.*not valid YAML"):
        argparser.parse_yaml_to_args(str(path), parse_app_args(["run"]))


def test_log_level_sets_the_samba_logger():
    import logging

    from sambaflow.logging import set_log_level

    try:
        parse_app_args(["run", "--log-level", "ERROR"])
        assert logging.getLogger("sambaflow").getEffectiveLevel() == logging.ERROR
    finally:
        set_log_level("warning")
