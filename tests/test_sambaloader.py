"""SambaLoader: real overlap of batch making with steps, errors that surface, nothing left behind."""

import gc
import json
import multiprocessing
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import sambaflow.samba.utils as utils
from sambaflow import samba
from sambaflow.app.measure import measure_performance
from sambaflow.data import loader as loader_module
from sambaflow.errors import SambaArgumentError, SambaRunError
from sambaflow.logging import samba_logger
from sambaflow.samba.sambaloader import SambaLoader

from models import LogReg

FEATURES, CLASSES, BATCH = 8, 3, 4


class Samples(Dataset):
    """`n` (features, label) samples; item `fail_at` raises, every item sleeps `sleep_s`."""

    def __init__(self, n: int, sleep_s: float = 0.0, fail_at: int | None = None) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, FEATURES, generator=gen)
        self.y = torch.randint(CLASSES, (n,), generator=gen)
        self.sleep_s, self.fail_at = sleep_s, fail_at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == self.fail_at:
            raise ValueError(f"sample {i} is corrupt")
        time.sleep(self.sleep_s)
        return self.x[i], self.y[i]


def producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("SambaLoader(")]


def traced_logreg() -> list:
    model = LogReg(FEATURES, CLASSES)
    samba.from_torch_model_(model)
    x = samba.randn(BATCH, FEATURES, name="x", batch_dim=0)
    y = samba.randint(CLASSES, (BATCH,), name="y", batch_dim=0)
    # lr 0: every step's loss depends on its batch only, so both loops must give the same losses.
    utils.trace_graph(model, [x, y], samba.optim.SGD(model.parameters(), lr=0.0), backend="reference")
    return model, x, y


# --- overlap --------------------------------------------------------------------------------------
def test_producing_the_next_batch_overlaps_the_step():
    """L ms to make a batch, S ms a step: about max(L, S) per batch with SambaLoader, L + S without."""
    make_s = step_s = 0.04
    n = 15
    model, _, _ = traced_logreg()

    def collate(samples):
        time.sleep(make_s)  # decoding / augmentation; sleeping releases the GIL like real work
        return torch.utils.data.default_collate(samples)

    data = DataLoader(Samples(n * BATCH), batch_size=BATCH, collate_fn=collate)

    def step(x, y):  # a real run of the traced step, padded to S ms (device work releases the GIL)
        begin = time.perf_counter()
        loss = samba.session.run([x, y], model.output_tensors)[0].item()
        time.sleep(max(0.0, step_s - (time.perf_counter() - begin)))
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy neighbour makes 2-thread OpenMP steps erratic, not slower loaders
    try:
        without, with_loader, plain, fed = loops(data, step)
    finally:
        torch.set_num_threads(threads)
    serial = (make_s + step_s) * n
    assert fed == plain and len(fed) == n
    assert without > 0.9 * serial, f"the plain loop took {without:.3f} s, expected about {serial:.3f} s"
    assert with_loader < 0.75 * serial, (
        f"with SambaLoader {with_loader:.3f} s, without {without:.3f} s: expected about "
        f"{max(make_s, step_s) * n + make_s:.3f} s (overlap)"
    )


def loops(data: DataLoader, step) -> tuple[float, float, list, list]:
    """(seconds without SambaLoader, with it, the losses of each)."""
    begin = time.perf_counter()
    plain = [
        step(samba.from_torch_tensor(x, name="x"), samba.from_torch_tensor(y, name="y")) for x, y in data
    ]
    without = time.perf_counter() - begin
    begin = time.perf_counter()
    fed = [step(x, y) for x, y in SambaLoader(data, ["x", "y"])]
    with_loader = time.perf_counter() - begin
    return without, with_loader, plain, fed


# --- batches, names, hooks ------------------------------------------------------------------------
def test_batches_are_named_in_order_with_hook_and_original_batch():
    data = [{"image": torch.full((2, 3), float(i)), "label": torch.tensor([i, i])} for i in range(6)]
    loader = SambaLoader(
        data,
        ["image", "label"],
        maxsize=2,
        function_hook=lambda b: (b["image"], b["label"]),
        return_original_batch=True,
        batch_dim=0,
    )
    seen = list(loader)
    assert len(loader) == 6 and len(seen) == 6
    for i, ((image, label), original) in enumerate(seen):
        assert isinstance(image, samba.SambaTensor) and (image.sn_name, label.sn_name) == ("image", "label")
        assert image.batch_dim == 0 and original is data[i] and torch.equal(image, data[i]["image"])
        assert image.data_ptr() == data[i]["image"].data_ptr()  # no copy without pinned memory
    plain = list(SambaLoader([(d["image"], d["label"]) for d in data], ["image", "label"], maxsize=0))
    assert [len(b) for b in plain] == [2] * 6 and torch.equal(plain[5][1], data[5]["label"])


def test_a_wrong_batch_says_what_to_give():
    with pytest.raises(SambaRunError, match=r"a batch has 2 tensors but 1 names"):
        list(SambaLoader([(torch.ones(1), torch.ones(1))], ["x"]))
    with pytest.raises(SambaRunError, match=r"tensor or a list/tuple of tensors, got dict.*function_hook="):
        list(SambaLoader([{"x": torch.ones(1)}], ["x"]))


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"names": "x"}, "names must be a non-empty list"),
        ({"names": []}, "names must be a non-empty list"),
        ({"maxsize": -1}, "maxsize must be an int >= 0"),
        ({"timeout": 0}, "timeout must be a number of seconds > 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, text):
    with pytest.raises(SambaArgumentError, match=text):
        SambaLoader([], **({"names": ["x"]} | kwargs))


# --- errors surface -------------------------------------------------------------------------------
def test_a_loader_exception_keeps_its_type_and_traceback_and_names_the_loader():
    data = DataLoader(Samples(6 * BATCH, fail_at=3 * BATCH + 1), batch_size=BATCH)
    seen = 0
    with pytest.raises(ValueError, match="sample 13 is corrupt") as caught:
        for _ in SambaLoader(data, ["x", "y"]):
            seen += 1
    assert seen == 3
    note = "\n".join(caught.value.__notes__)
    assert "SambaLoader(names=['x', 'y'])" in note and "batch 3" in note
    assert any(entry.name == "__getitem__" for entry in caught.traceback)  # the dataset's own frame
    assert not producers()


def test_a_timeout_names_the_loader_and_how_to_fix_it_instead_of_hanging():
    data = DataLoader(Samples(4, sleep_s=1.0), batch_size=1)
    begin = time.perf_counter()
    with pytest.raises(
        SambaRunError, match=r"SambaLoader\(names=\['x', 'y'\]\): batch 0 .*timeout=0.2 s"
    ) as caught:
        list(SambaLoader(data, ["x", "y"], timeout=0.2))
    assert "pass a larger timeout" in str(caught.value)
    assert time.perf_counter() - begin < 0.2 + loader_module.JOIN_S
    assert not producers()  # closing waited for the batch in progress, then the thread ended


# --- nothing left behind --------------------------------------------------------------------------
def test_an_early_break_stops_a_producer_blocked_on_a_full_queue():
    data = [(torch.ones(2), torch.zeros(2)) for _ in range(100)]
    for i, _ in enumerate(SambaLoader(data, ["x", "y"], maxsize=2)):
        if i == 0:
            time.sleep(0.1)  # the producer fills the queue and blocks in put
            assert len(producers()) == 1
            break
    assert not producers()


def test_an_exception_in_the_loop_body_stops_the_producer():
    with pytest.raises(KeyError) as caught:
        for _ in SambaLoader([(torch.ones(2),)] * 100, ["x"], maxsize=1):
            raise KeyError("the step failed")
    assert caught.value.__traceback__ is not None and not producers()  # even while the traceback lives


def test_an_abandoned_iterator_stops_its_producer_when_collected():
    batches = iter(SambaLoader([(torch.ones(2),)] * 100, ["x"], maxsize=1))
    next(batches)
    assert len(producers()) == 1
    del batches
    gc.collect()
    assert not producers()


def test_an_early_break_shuts_down_the_data_loaders_worker_processes():
    before = set(multiprocessing.active_children())
    data = DataLoader(Samples(40 * BATCH), batch_size=BATCH, num_workers=1)
    for _ in SambaLoader(data, ["x", "y"]):
        assert len(set(multiprocessing.active_children()) - before) == 1  # the worker is running
        break
    assert not producers()
    assert not set(multiprocessing.active_children()) - before


# --- pinned memory --------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of enable_pinned_memory")
def test_pinned_memory_on_the_cpu_changes_nothing_and_says_so_once(capsys):
    data = [(torch.randn(2, 3),) for _ in range(3)]
    samba_logger.reset_limits()
    samba.session.enable_pinned_memory()
    try:
        first = [x for (x,) in SambaLoader(data, ["x"])]
        second = [x for (x,) in SambaLoader(data, ["x"])]
    finally:
        samba.session.disable_pinned_memory()
    assert all(a.data_ptr() == d[0].data_ptr() for a, d in zip(first, data)) and len(second) == 3
    assert capsys.readouterr().err.count(loader_module.CPU_PINNING_NOTE) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pinned_memory_on_a_gpu_copies_batches_to_the_device():
    samba.session.store["on_gpu"] = torch.zeros(1, device="cuda")  # the session's tensors live on the GPU
    data = [(torch.randn(64, 32), torch.arange(64)) for _ in range(4)]
    samba.session.enable_pinned_memory()
    try:
        batches = list(SambaLoader(data, ["x", "y"], maxsize=2))
    finally:
        samba.session.disable_pinned_memory()
    for (x, y), (hx, hy) in zip(batches, data):
        assert x.is_cuda and x.sn_name == "x" and torch.equal(x.cpu(), hx) and torch.equal(y.cpu(), hy)


# --- measure_performance -------------------------------------------------------------------------
def test_measure_performance_feeds_the_timed_runs_from_a_sambaloader(tmp_path, capsys, monkeypatch):
    model, x, y = traced_logreg()
    made = []
    convert = SambaLoader.convert
    monkeypatch.setattr(SambaLoader, "convert", lambda self, *a: made.append(1) or convert(self, *a))
    report = tmp_path / "perf.json"
    throughput, latency = measure_performance(
        model, [x, y], BATCH, n_iterations=5, use_sambaloader=True, json=str(report)
    )
    assert "fed by a SambaLoader" in capsys.readouterr().out
    assert 5 <= len(made) <= 5 + 10 + 1  # the timed runs' batches, plus at most a full queue
    data = json.loads(report.read_text())
    assert data["use_sambaloader"] is True and data["n_iterations"] == 5 and throughput > 0 < latency
    assert not producers()
