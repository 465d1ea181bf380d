"""The optimizer helpers: Adam state allocated ahead of the first step is torch's own."""

import os
from pathlib import Path

import pytest
import torch

from r1_lightning.optim import FlatGradients, allocate_adam_state, mapped_zeros, place_optimizer_memory


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        self.unused = torch.nn.Linear(2, 2)  # requires grad but never gets one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Model()


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4) -> None:
    data = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(data).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95)),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    ],
    ids=["adamw", "adam-amsgrad", "adamw-for-loop"],
)
def test_allocated_state_matches_torch_lazy_state_and_steps_identically(make):
    lazy_model, eager_model = _model(), _model()
    lazy, eager = make(lazy_model.parameters()), make(eager_model.parameters())
    assert allocate_adam_state(eager) == 6  # 3 Linears × (weight, bias), the unused one included
    _train(lazy_model, lazy)
    _train(eager_model, eager)
    for p_lazy, p_eager in zip(lazy_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p_eager, p_lazy, rtol=0, atol=0)
        s_lazy, s_eager = lazy.state[p_lazy], eager.state[p_eager]
        if not s_lazy:  # the unused Linear: torch never creates its state; ours stays at zero
            assert float(s_eager["step"]) == 0 and not s_eager["exp_avg"].any()
            continue
        assert s_eager.keys() == s_lazy.keys()
        for key in s_lazy:
            assert (s_eager[key].dtype, s_eager[key].device, s_eager[key].stride()) == (
                s_lazy[key].dtype, s_lazy[key].device, s_lazy[key].stride()
            ), key
            torch.testing.assert_close(s_eager[key], s_lazy[key], rtol=0, atol=0)


def test_restored_state_is_kept_and_other_optimizers_are_left_alone():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, steps=2)
    restored = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters() if optimizer.state[p]}
    assert allocate_adam_state(optimizer) == 2  # only the unused Linear had none
    for p in model.parameters():
        if id(p) in restored:
            assert float(optimizer.state[p]["step"]) == 2
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], restored[id(p)]["exp_avg"], rtol=0, atol=0)

    sgd = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9)
    assert allocate_adam_state(sgd) == 0 and not sgd.state


def _two_heads_model() -> torch.nn.Module:
    model = _model()
    model.big = torch.nn.Parameter(torch.randn(10, 6, generator=torch.Generator().manual_seed(2)))  # over the (patched) limit
    return model


def _train_with(model, optimizer, grads: FlatGradients | None, steps: int = 3) -> None:
    data = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        if grads is not None:
            grads.allocate()
        for half in (data[:4], data[4:]):  # two micro-batches accumulate into one step
            (model(half).square().mean() + (half @ model.big.T).tanh().mean()).backward()
        if grads is not None:
            grads.drop_unreceived()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_flat_gradients_step_bit_identically_and_share_one_block(monkeypatch):
    monkeypatch.setattr("r1_lightning.optim.GLIBC_HEAP_REQUEST_LIMIT", 50 * 4)  # `big` (60 floats) is "mapped on its own"
    plain_model, flat_model = _two_heads_model(), _two_heads_model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.1)
    flat = torch.optim.AdamW(flat_model.parameters(), lr=1e-2, weight_decay=0.1)
    grads = FlatGradients(flat_model.parameters())
    assert all(p is not flat_model.big for p in grads.parameters) and len(grads.parameters) == 6

    _train_with(plain_model, plain, None)
    _train_with(flat_model, flat, grads)
    for p_plain, p_flat in zip(plain_model.parameters(), flat_model.parameters()):
        torch.testing.assert_close(p_flat, p_plain, rtol=0, atol=0)
    # The unused Linear got no gradient: torch.optim never touched it (no state, no weight decay).
    assert not flat.state[flat_model.unused.weight] and flat_model.unused.weight.grad is None

    grads.allocate()
    storages = {p.grad.untyped_storage().data_ptr() for p in grads.parameters}
    assert len(storages) == 1 and all(not p.grad.any() for p in grads.parameters)
    flat_model(torch.ones(2, 6)).sum().backward()
    grads.drop_unreceived()
    assert flat_model.unused.weight.grad is None and flat_model.net[0].weight.grad.abs().sum() > 0
    flat.zero_grad(set_to_none=True)

    grads.remove()
    flat_model(torch.ones(2, 6)).sum().backward()
    grads.allocate()  # detached: torch's own gradients stay
    assert flat_model.net[0].weight.grad.untyped_storage().data_ptr() != flat_model.net[2].weight.grad.untyped_storage().data_ptr()


def test_flat_gradients_leave_existing_gradients_alone():
    model = _model()
    grads = FlatGradients(model.parameters())
    model(torch.ones(2, 6)).sum().backward()
    before = model.net[0].weight.grad.clone()
    grads.allocate()  # gradients already there (a step not zeroed yet): nothing moves
    grads.drop_unreceived()
    torch.testing.assert_close(model.net[0].weight.grad, before, rtol=0, atol=0)


def _resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from Linux's /proc")
def test_mapped_zeros_are_zeros_whose_memory_goes_back_to_the_system_with_the_last_view():
    assert torch.equal(mapped_zeros(3, torch.float64, torch.device("cpu")), torch.zeros(3, dtype=torch.float64))
    before = _resident_mib()
    block = mapped_zeros(16 * 2**20, torch.float32, torch.device("cpu"))  # 64 MiB
    assert block.shape == (16 * 2**20,) and block.dtype == torch.float32
    block.fill_(1.0)  # the pages become resident as they are touched
    assert _resident_mib() - before > 60
    view = block[:8].view(2, 4)
    del block
    assert view.sum().item() == 8  # a view keeps the mapping alive
    touched = _resident_mib()
    del view
    assert touched - _resident_mib() > 60  # unmapped, not kept by the allocator


@pytest.mark.parametrize(("device", "world_size"), [("cpu", 1), ("cpu", 2), ("meta", 1)])
def test_placement_is_for_cpu_and_flat_gradients_for_one_process(device, world_size):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    flat = place_optimizer_memory(optimizer, torch.device(device), world_size)
    assert bool(optimizer.state) == (device == "cpu")
    assert len(flat.parameters) == (2 if (device, world_size) == ("cpu", 1) else 0)
    flat.allocate()
    assert (model.weight.grad is not None) == (len(flat.parameters) == 2)
    flat.remove()
