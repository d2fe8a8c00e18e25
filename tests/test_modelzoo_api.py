"""The API surface SambaNova's modelzoo training apps use, in our own words and models.

The modelzoo traces `forward(**inputs)` with a dict whose values are tensors, tuples of tensors
(the article-attention mask pair) and Python constants; its model code caches tensors across calls
(RoPE cos/sin tables in a module-level dict, zero paddings checked with `.item()`); it compiles
with parameters on the `meta` device; it runs with one output tensor whose `sn_grad` is a
per-token gradient scale. Semantics run on the reference backend; numerics compare with eager
PyTorch on fresh random data.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sambaflow import samba
from sambaflow.errors import SambaTraceError
from sambaflow.pef.file import PefFile
from sambaflow.samba.utils import trace_graph
from sambaflow.samba.utils.pef_utils import PefInfoStruct, get_pef_info, get_pefmeta_dict

from helpers import rel_err

VOCAB, WIDTH, BATCH, SEQ = 40, 16, 4, 8

#: module-level cache keyed by sequence length, as the modelzoo's RoPE tables are
ROPE_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


class RopeTables(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        inv = 1.0 / (10000 ** (torch.arange(0, width, 2).float() / width))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"tables_{seq}"
        if key not in ROPE_TABLES:
            angles = torch.outer(torch.arange(seq, dtype=torch.float32), self.inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            ROPE_TABLES[key] = (angles.cos(), angles.sin())
        return ROPE_TABLES[key]


class CachingLM(nn.Module):
    """A small LM whose forward reads tensors cached across calls and takes keyword inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.rope = RopeTables(WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.padding: torch.Tensor | None = None  # made on first use, checked with .item() after

    def forward(self, input_ids, attention_mask=None, labels=None, scale=1.0, return_dict=True):
        h = self.embed(input_ids)
        cos, sin = self.rope(h.shape[1])
        if self.padding is None:
            self.padding = torch.zeros(h.shape[-1])
        if not torch.all(self.padding == 0).item():
            raise RuntimeError("cached padding is not zero")
        h = h * cos + h.flip(-1) * sin + self.padding
        if attention_mask is not None:  # a pair of collapsed masks, as article attention
            same = (attention_mask[0] == attention_mask[1]).float()  # [B, 1, S, S]
            h = h + same.squeeze(1) @ h / SEQ
        logits = self.head(torch.tanh(self.mix(h)) * scale)
        loss = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1).long(), reduction="none")
        return {"loss": loss, "logits": logits} if return_dict else (loss, logits)


def batch() -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(VOCAB, (BATCH, SEQ), dtype=torch.int32),
        "mask_1": torch.randint(3, (BATCH, 1, 1, SEQ)).float(),
        "mask_2": torch.randint(3, (BATCH, 1, SEQ, 1)).float(),
        "labels": torch.randint(VOCAB, (BATCH, SEQ), dtype=torch.int32),
    }


def keyword_inputs(data: dict[str, torch.Tensor], **constants) -> dict:
    named = {k: samba.from_torch_tensor(v, name=k) for k, v in data.items()}
    return {
        "input_ids": named["input_ids"],
        "attention_mask": (named["mask_1"], named["mask_2"]),
        "labels": named["labels"],
        **constants,
    }


def eager_loss(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = (data["mask_1"], data["mask_2"])
    return model(data["input_ids"], mask, data["labels"], scale=0.5, return_dict=False)[0]


def scale_for(data: dict[str, torch.Tensor]) -> torch.Tensor:
    """A per-token gradient scale summing to one (the modelzoo's loss-mask normalisation)."""
    scale = (torch.rand(BATCH * SEQ) > 0.2).float()
    return scale / scale.sum()


def fresh_pair() -> tuple[nn.Module, nn.Module]:
    ROPE_TABLES.clear()
    reference = CachingLM()
    model = copy.deepcopy(reference)
    samba.from_torch_model_(model)
    return reference, model


def train_against_eager(model, reference, outputs, steps=4, lr=1e-2):
    eager = torch.optim.AdamW(reference.parameters(), lr=lr, betas=(0.9, 0.997), weight_decay=0.0)
    for _ in range(steps):
        data = batch()
        scale = scale_for(data)
        outputs[0].sn_grad = scale
        got = samba.session.run(keyword_inputs(data), outputs[0])  # one output tensor
        eager.zero_grad()
        loss = eager_loss(reference, data)
        loss.backward(scale)
        eager.step()
        assert rel_err(got[0], loss) < 1e-5
    samba.session.to_cpu(model)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p, q) < 1e-5, name


def test_keyword_inputs_with_tuples_constants_and_caches_train_like_eager():
    reference, model = fresh_pair()
    optim = samba.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = keyword_inputs(batch(), scale=0.5, return_dict=False)
    outputs = trace_graph(model, inputs, optim, loss_indices=[0])
    assert len(outputs) == 2 and outputs[0].shape == (BATCH * SEQ,)
    train_against_eager(model, reference, outputs)


def test_model_output_dicts_flatten_to_outputs():
    _, model = fresh_pair()
    outputs = trace_graph(
        model, keyword_inputs(batch(), scale=0.5), samba.optim.SGD(model.parameters(), lr=0.1)
    )
    assert [tuple(o.shape) for o in outputs] == [(BATCH * SEQ,), (BATCH, SEQ, VOCAB)]


def test_cached_tensors_become_graph_constants_of_their_real_value():
    _, model = fresh_pair()
    trace_graph(model, keyword_inputs(batch(), scale=0.5), None)
    graph = samba.session.executable.graph.module
    constants = [getattr(graph, n.target) for n in graph.graph.nodes if n.op == "get_attr"]
    cos, _ = ROPE_TABLES[f"tables_{SEQ}"]
    assert not any(type(t).__name__ == "FakeTensor" for t in ROPE_TABLES[f"tables_{SEQ}"])
    assert any(c.shape == cos.shape and torch.equal(c, cos) for c in constants)


def test_a_second_trace_reuses_the_real_cache():
    _, model = fresh_pair()
    trace_graph(model, keyword_inputs(batch(), scale=0.5), None)
    first = ROPE_TABLES[f"tables_{SEQ}"][0]
    samba.session.reset()
    trace_graph(model, keyword_inputs(batch(), scale=0.5), None)
    assert ROPE_TABLES[f"tables_{SEQ}"][0] is first


def test_dict_keys_that_are_not_forward_parameters_are_refused_by_name():
    _, model = fresh_pair()
    data = batch()
    inputs = {"input_ids": samba.from_torch_tensor(data["input_ids"], name="input_ids"), "bogus": 1}
    with pytest.raises(SambaTraceError, match="bogus"):
        trace_graph(model, inputs, None)


def test_unnamed_tensor_in_a_tuple_is_refused_naming_where():
    _, model = fresh_pair()
    inputs = keyword_inputs(batch())
    inputs["attention_mask"] = (inputs["attention_mask"][0], torch.ones(BATCH, 1, SEQ, 1))
    with pytest.raises(SambaTraceError, match=r"attention_mask\[1\]"):
        trace_graph(model, inputs, None)


def as_meta(model: nn.Module) -> nn.Module:
    """Parameters on the meta device, buffers kept (what accelerate's init_empty_weights makes)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
    return model


#: RDU compiler settings as SambaNova's configs give them (no effect here)
COMPILE_SETTINGS = {
    "arch": "sn30",
    "optim_level": "o1",
    "tiling_accum": "bf16sr",
    "enable_hypersection": True,
}


@pytest.fixture(scope="module")
def meta_pef(tmp_path_factory):
    """A training PEF compiled from a model whose parameters are on the meta device."""
    ROPE_TABLES.clear()
    model = as_meta(CachingLM())
    samba.from_torch_model_(model)
    optim = samba.optim.AdamW(model.parameters(), lr=1e-2)
    folder = tmp_path_factory.mktemp("meta_pef")
    samba.session.setup(COMPILE_SETTINGS)
    path = samba.session.compile(
        model,
        keyword_inputs(batch(), scale=0.5, return_dict=False),
        optimizers=optim,
        name="caching_lm",
        config_dict={"output_folder": str(folder), **COMPILE_SETTINGS},
        pef_metadata=get_pefmeta_dict({"app_args": {"seq": SEQ}, "optim_level": "o1"}, model),
        loss_indices=[0],
    )
    samba.session.reset()
    return path


def test_compile_with_optimizers_keyword_writes_a_training_pef(meta_pef):
    assert "train" in PefFile(meta_pef).kinds


def test_meta_compiled_pef_trains_real_weights_like_eager(meta_pef):
    reference, model = fresh_pair()
    optim = samba.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = keyword_inputs(batch(), scale=0.5, return_dict=False)
    outputs = trace_graph(model, inputs, optim, loss_indices=[0], pef=meta_pef)
    train_against_eager(model, reference, outputs, steps=3)


def test_pef_metadata_reads_back_by_key(meta_pef):
    got = get_pef_info(meta_pef, {"app_args": PefInfoStruct({}), "optim_level": PefInfoStruct(None)})
    assert got == {"app_args": {"seq": SEQ}, "optim_level": "o1"}
    assert get_pef_info(meta_pef, ["model"]) == {"model": "CachingLM"}
    with pytest.raises(ValueError, match="not_there"):
        get_pef_info(meta_pef, {"not_there": PefInfoStruct(1)})


def test_rdu_settings_are_listed_in_one_compile_log_line(meta_pef):
    log = open(meta_pef.removesuffix(".pef") + ".compile.log").read()
    lines = [line for line in log.splitlines() if "no effect here" in line]
    assert len(lines) == 1
    for key, value in COMPILE_SETTINGS.items():
        assert f"{key}={value}" in lines[0]
    assert "output_folder" not in lines[0]


def test_setup_records_the_apps_arguments():
    samba.session.setup({"arch": "sn30", "pef": "x.pef"})
    assert samba.session.setup_args == {"arch": "sn30", "pef": "x.pef"}
    with pytest.raises(Exception, match="session.setup"):
        samba.session.setup(42)


def test_argconf_accepts_the_configs_keys_and_suggests_for_typos():
    pytest.importorskip("pydantic")
    from sambaflow.app.rdu_settings import EFFECTIVE, RDU_ONLY
    from sambaflow.samba.argconf.args import CommonArgs, CompileArgs, RunArgs, rdu_only_settings

    compile_args = CompileArgs(
        arch="sn30",
        output_folder="out",
        optim_level="o1",
        enable_mixed_precision_ops=["gemm", "softmax"],
        resources_scaling_factors=["4", "4", "4"],
        num_tiles=4,
        data_parallel=True,
        world_size=2,
    )
    assert compile_args.resources_scaling_factors == [4.0, 4.0, 4.0]
    assert set(rdu_only_settings(compile_args)) == {
        "arch",
        "optim_level",
        "enable_mixed_precision_ops",
        "resources_scaling_factors",
        "num_tiles",
    }
    assert RunArgs(pef="a.pef", arch="sn30").pef == "a.pef"
    # every field is either effective or listed as RDU-only: none is silently ignored
    fields = set(CompileArgs.model_fields) | set(RunArgs.model_fields)
    assert fields == (fields & EFFECTIVE) | (fields & set(RDU_ONLY))
    assert set(CommonArgs.model_fields) <= set(CompileArgs.model_fields) & set(RunArgs.model_fields)
    with pytest.raises(ValueError, match="did you mean 'optim_level'"):
        CompileArgs(optim_levl="o1")
    with pytest.raises(ValueError, match="no argument 'samba_pef'"):
        RunArgs(samba_pef="x")


def test_traced_on_meta_without_transfer_then_to_device_trains_real_weights(meta_pef):
    """The data-parallel app's order: trace meta weights with transfer_device=False, build the model
    again with real weights, convert it, to_device(), train; to_cpu fills the new model."""
    ROPE_TABLES.clear()
    traced = as_meta(CachingLM())
    samba.from_torch_model_(traced)
    optim = samba.optim.AdamW(traced.parameters(), lr=1e-2)
    inputs = keyword_inputs(batch(), scale=0.5, return_dict=False)
    outputs = trace_graph(traced, inputs, optim, loss_indices=[0], pef=meta_pef, transfer_device=False)
    assert not any(p.has_data for p in samba.session._traced_tensors())
    reference, model = fresh_pair()  # real weights, converted last
    samba.session.to_device()
    assert set(samba.session.optim_dict) >= {"embed__weight__exp_avg", "head__bias__exp_avg_sq"}
    train_against_eager(model, reference, outputs, steps=2)


def test_to_device_refuses_a_model_without_values():
    _, model = fresh_pair()
    trace_graph(model, keyword_inputs(batch(), scale=0.5), None)
    with pytest.raises(Exception, match="meta device"):
        samba.session.to_device(as_meta(CachingLM()))


def test_to_cpu_with_no_graph_leaves_host_weights_alone():
    model = CachingLM()
    before = [p.clone() for p in model.parameters()]
    samba.session.to_cpu(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_rank_helpers_without_a_launcher(monkeypatch):
    from sambaflow.samba.utils import get_rank, get_world_size, is_main_process

    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert (get_rank(), get_world_size(), is_main_process()) == (1, 2, False)


def test_init_process_group_mpi_joins_with_gloo_and_says_so():
    import subprocess
    import sys

    code = (
        "import torch, torch.distributed as dist\n"
        "from sambaflow import samba\n"
        "assert not dist.is_mpi_available()\n"
        "dist.init_process_group(backend='mpi')\n"
        "print(dist.get_backend(), dist.get_world_size())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "gloo 1"
    assert sum("no MPI backend" in line and "gloo" in line for line in lines) == 1


def test_load_sharded_checkpoint_fills_meta_parameters(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from sambaflow.samba.utils.checkpoint import load_sharded_checkpoint

    source = CachingLM()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    model = as_meta(CachingLM())
    samba.from_torch_model_(model)
    load_sharded_checkpoint(model, str(tmp_path), ignore_dtype_mismatch=True)
    for (name, p), q in zip(model.named_parameters(), source.parameters()):
        assert p.has_data and torch.equal(p, q) and p.sn_name == name.replace(".", "__")
    del state["head.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(Exception, match=r"missing \['head.bias'\]"):
        load_sharded_checkpoint(CachingLM(), str(tmp_path))


def test_lazy_parameters_are_repeatable_under_a_seed():
    from sambaflow.samba.lazy_param import RNGProviderFactory
    from sambaflow.samba.nn.parameter import SambaParameter

    def make():
        provider = RNGProviderFactory().build_provider()
        return SambaParameter(
            shape=(64, 32),
            dtype=torch.bfloat16,
            materializer=lambda p: provider().normal(0.0, 0.02, p.shape, dtype=p.dtype),
        )

    torch.manual_seed(3)
    a = make()
    torch.manual_seed(3)
    b = make()
    assert torch.equal(a, b) and a.dtype == torch.bfloat16
    assert abs(a.float().std().item() - 0.02) < 0.004 and abs(a.float().mean().item()) < 0.004


class PerTokenLoss(nn.Module):
    """Returns a loss module's per-token losses (reduction='none') and the logits, as the modelzoo's LMs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, VOCAB)

    def forward(self, x, labels):
        logits = self.proj(x)
        loss = nn.CrossEntropyLoss(reduction="none")(logits.view(-1, VOCAB), labels.view(-1))
        return loss, logits


def test_loss_module_outputs_are_seeded_with_one_by_default():
    reference = PerTokenLoss()
    model = copy.deepcopy(reference)
    samba.from_torch_model_(model)
    x, labels = torch.randn(BATCH, SEQ, WIDTH), torch.randint(VOCAB, (BATCH, SEQ))
    inputs = [samba.from_torch_tensor(x, name="x"), samba.from_torch_tensor(labels, name="labels")]
    trace_graph(model, inputs, samba.optim.SGD(model.parameters(), lr=0.1))
    assert samba.session.executable.graph.loss_names == ["crossentropyloss__outputs__0"]
    samba.session.run(inputs)
    loss, _ = reference(x, labels)
    loss.sum().backward()  # seed one for every per-token loss, zero for the logits
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    samba.session.to_cpu(model)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert rel_err(p, q) < 1e-5


def test_bf16_weights_take_the_same_adamw_steps_as_eager():
    """torch's AdamW rounds once per in-place op on bf16 weights; so must the traced update, or
    the weights drift from eager's by an ulp on many elements each step."""
    torch.manual_seed(1)
    reference = nn.Sequential(nn.Linear(WIDTH, 64), nn.Tanh(), nn.Linear(64, 8)).bfloat16()
    model = copy.deepcopy(reference)
    samba.from_torch_model_(model)
    x = samba.from_torch_tensor(torch.randn(BATCH, WIDTH).bfloat16(), name="x")
    out = trace_graph(model, [x], samba.optim.AdamW(model.parameters(), lr=1e-2))[0]
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.997), weight_decay=0.0)
    for _ in range(6):
        data = torch.randn(BATCH, WIDTH).bfloat16()
        seed = torch.randn(BATCH, 8).bfloat16()
        samba.session.run([samba.from_torch_tensor(data, name="x")], grad_of_outputs=[seed])
        eager.zero_grad()
        reference(data).backward(seed)
        eager.step()
    samba.session.to_cpu(model)
    changed = [(p != q).float().mean().item() for p, q in zip(model.parameters(), reference.parameters())]
    assert changed == [0.0] * len(changed), changed
    assert out.dtype == torch.bfloat16


class Hinted(nn.Module):
    """Model code that gives the RDU compiler fusion hints, as the modelzoo's hyperfunctions do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        from sambaflow.samba.directives import op_fusion

        with op_fusion(
            func_name="encoder_test", heuristic={"tiling": "kTestHeuristic"}, plugins=["libTest.so"]
        ):
            return self.proj(x).sum()


def test_fusion_heuristics_and_plugins_join_the_no_effect_line(tmp_path):
    model = Hinted()
    samba.from_torch_model_(model)
    x = samba.from_torch_tensor(torch.randn(BATCH, WIDTH), name="x")
    path = samba.session.compile(
        model, [x], None, name="hinted", config_dict={"output_folder": str(tmp_path)}
    )
    log = open(path.removesuffix(".pef") + ".compile.log").read()
    (line,) = [line for line in log.splitlines() if "no effect here" in line]
    assert "kTestHeuristic" in line and "libTest.so" in line
    # an unrelated model compiled next in this process: its log lists none of the first's hints
    plain = nn.Linear(WIDTH, 1)
    samba.from_torch_model_(plain)
    path = samba.session.compile(plain, [x], None, name="plain", config_dict={"output_folder": str(tmp_path)})
    log = open(path.removesuffix(".pef") + ".compile.log").read()
    assert "kTestHeuristic" not in log and "libTest.so" not in log


def test_a_cached_value_that_changed_since_compile_is_refused(meta_pef):
    """The PEF holds the cached tables it was compiled with; a run whose cache holds other values
    (a table computed from other settings) must not run the stale ones silently."""
    from sambaflow.errors import SambaPefError

    _, model = fresh_pair()
    cos, sin = RopeTables(WIDTH)(SEQ)
    ROPE_TABLES[f"tables_{SEQ}"] = (cos * 1.5, sin)
    optim = samba.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = keyword_inputs(batch(), scale=0.5, return_dict=False)
    with pytest.raises(SambaPefError, match="computation differs"):
        trace_graph(model, inputs, optim, loss_indices=[0], pef=meta_pef)


def test_make_assets_writes_the_generative_data_prep_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    import sys

    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent / "examples" / "modelzoo"))
    try:
        import make_assets
    finally:
        sys.path.pop(0)
    out = make_assets.write_assets(tmp_path, max_seq_length=32, n_train=16, n_dev=4)
    assert yaml.safe_load((out / "dataset" / "metadata.yaml").read_text())["max_seq_length"] == 32
    with h5py.File(out / "dataset" / "train_1_of_1.hdf5") as f:
        assert set(f) == {"input_ids", "token_type_ids"}
        ids, types = f["input_ids"][:], f["token_type_ids"][:]
    assert ids.shape == types.shape == (16, 32) and ids.dtype.name == "int32"
    assert (types == types[0]).all()  # every row trains on as many tokens (data parallel == one process)
    assert set(types[0].tolist()) == {0, 1, 2, 3}  # prompt, completion, padding, article end
    tokenizer = AutoTokenizer.from_pretrained(str(out / "trained_rdu"))
    config = AutoConfig.from_pretrained(str(out / "llama"))
    assert (
        config.model_type == "llama" and ids.max() < config.vocab_size and len(tokenizer) <= config.vocab_size
    )
    AutoModelForCausalLM.from_pretrained(str(out / "llama"))
    commands = make_assets.commands(out, "/mz", 32)
    assert (
        f"checkpoint.model_name_or_path={out}/llama" in commands and "torchrun --nproc_per_node 2" in commands
    )


def test_tracing_meta_weights_onto_the_device_is_refused():
    ROPE_TABLES.clear()
    model = as_meta(CachingLM())
    samba.from_torch_model_(model)
    with pytest.raises(Exception, match="transfer_device=False"):
        trace_graph(model, keyword_inputs(batch(), scale=0.5), None)


def test_pef_info_of_a_missing_file_says_which():
    from sambaflow.errors import SambaPefError

    with pytest.raises(SambaPefError, match="nowhere.pef"):
        get_pef_info("/nowhere.pef", ["arch"])
