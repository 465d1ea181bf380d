"""Float32 CPU products through oneDNN (`rl.cpu_matmul`): the same values and gradients as aten's, both backends."""

import json
import logging

import pytest
import torch

from r1_lightning.engines.logprobs import chunked_token_logprobs
from r1_lightning.errors import ConfigError
from r1_lightning.policy import token_logprobs
from r1_lightning.rl import cpu_matmul

ONEDNN = pytest.param(
    "onednn", marks=pytest.mark.skipif(cpu_matmul._onednn_op() is None, reason="this torch build has no oneDNN linear op")
)


@pytest.fixture(params=[ONEDNN, "default"])
def backend(request, monkeypatch):
    monkeypatch.setenv(cpu_matmul.ENV, request.param)
    cpu_matmul.clear_decisions()
    yield request.param
    cpu_matmul.clear_decisions()


def _float64_twins(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    exact = [torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True) for shape in shapes]
    single = [t.detach().float().requires_grad_() for t in exact]
    return exact, single


def _relative(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_values_and_gradients_match_float64(backend, with_bias):
    (x, w, b), (xf, wf, bf) = _float64_twins((3, 17, 48), (80, 48), (80,))
    out64 = torch.nn.functional.linear(x, w, b if with_bias else None)
    out = cpu_matmul.linear(xf, wf, bf if with_bias else None)
    grad = torch.randn_like(out64)
    out64.backward(grad)
    out.backward(grad.float())
    assert out.shape == out64.shape and out.dtype == torch.float32
    # float32 products of 48 terms: within a few ulps of 1.2e-7, relative to the largest entry.
    for ours, exact in [(out, out64), (xf.grad, x.grad), (wf.grad, w.grad)] + ([(bf.grad, b.grad)] if with_bias else []):
        assert _relative(ours, exact) < 2e-6
    assert (wf.grad is not None) and (bf.grad is None) == (not with_bias)


def test_mm_nt_takes_strided_operands(backend):
    """Column slices and transposes (what the LM head's backward passes) give `a @ b.T`."""
    generator = torch.Generator().manual_seed(1)
    sliced = torch.randn(12, 40, generator=generator)[:, 5:14]  # [12, 9], rows 40 apart: neither layout oneDNN takes
    transposed = torch.randn(9, 12, generator=generator).T  # [12, 9]
    b, b_transposed = torch.randn(30, 9, generator=generator), torch.randn(9, 30, generator=generator).T  # [30, 9] each
    for a in (sliced, transposed, sliced.contiguous()):
        for other in (b, b_transposed):
            torch.testing.assert_close(cpu_matmul.mm_nt(a, other), a @ other.T, rtol=1e-5, atol=1e-5)


def test_onednn_linears_route_nn_linear_and_leave_the_rest(monkeypatch):
    if cpu_matmul._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setenv(cpu_matmul.ENV, "onednn")
    cpu_matmul.clear_decisions()
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    with cpu_matmul.onednn_linears():
        routed = layer(x)
        float64 = layer.double()(x.detach().double())  # not float32: the aten kernel
        layer.float()
    assert type(routed.grad_fn).__name__ == "ViewBackward0"
    assert type(routed.grad_fn.next_functions[0][0]).__name__ == "_OneDNNLinearBackward"
    assert float64.grad_fn is None or "OneDNN" not in type(float64.grad_fn).__name__
    assert "OneDNN" not in type(layer(x).grad_fn).__name__  # outside the context: aten
    cpu_matmul.clear_decisions()


def test_default_backend_is_aten(monkeypatch):
    monkeypatch.setenv(cpu_matmul.ENV, "default")
    cpu_matmul.clear_decisions()
    layer = torch.nn.Linear(8, 4)
    with cpu_matmul.onednn_linears():
        out = layer(torch.randn(2, 8))
    assert type(out.grad_fn).__name__ == "AddmmBackward0"
    assert not cpu_matmul.eligible(torch.randn(2))
    cpu_matmul.clear_decisions()


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_matmul.ENV, "mkl")
    cpu_matmul.clear_decisions()
    with pytest.raises(ValueError, match=r"R1_CPU_MATMUL='mkl': choose one of auto, onednn, default"):
        cpu_matmul.use_onednn()
    cpu_matmul.clear_decisions()


def test_auto_probe_times_both(monkeypatch, tmp_path):
    if cpu_matmul._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear op")
    default_s, onednn_s = cpu_matmul.probe(repeats=2)
    assert default_s > 0 and onednn_s > 0
    monkeypatch.setenv(cpu_matmul.ENV, "auto")
    monkeypatch.setenv("R1_LIGHTNING_CACHE", str(tmp_path / "a"))
    monkeypatch.setattr(cpu_matmul, "probe", lambda: (1.0, 0.5))
    cpu_matmul.clear_decisions()
    assert cpu_matmul.use_onednn()
    monkeypatch.setenv("R1_LIGHTNING_CACHE", str(tmp_path / "b"))  # no kept decision: the probe decides
    monkeypatch.setattr(cpu_matmul, "probe", lambda: (1.0, 0.95))  # under MIN_SPEEDUP: the default stays
    cpu_matmul.clear_decisions()
    assert not cpu_matmul.use_onednn()
    cpu_matmul.clear_decisions()


def test_the_probe_decides_once_per_machine_and_later_processes_keep_it(monkeypatch, tmp_path, caplog):
    """A resumed run (or another rank) rounds as the run it continues: it reads the kept decision, it does not re-probe."""
    if cpu_matmul._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setenv(cpu_matmul.ENV, "auto")
    monkeypatch.setenv("R1_LIGHTNING_CACHE", str(tmp_path))
    probes = []
    monkeypatch.setattr(cpu_matmul, "probe", lambda: probes.append(1) or (1.0, 0.5))
    cpu_matmul.clear_decisions()
    assert cpu_matmul.use_onednn() and probes == [1]
    kept = json.loads((tmp_path / "cpu_matmul.json").read_text())
    assert kept == {cpu_matmul.machine_key(): {"onednn": True, "onednn_ms": 500.0, "default_ms": 1000.0}}
    monkeypatch.setattr(cpu_matmul, "probe", lambda: probes.append(2) or (1.0, 1.0))  # would now keep the default
    cpu_matmul.clear_decisions()
    with caplog.at_level(logging.INFO, logger=cpu_matmul.__name__):
        assert cpu_matmul.use_onednn() and probes == [1]
    assert f"oneDNN (this machine's probe, kept in {tmp_path / 'cpu_matmul.json'}" in caplog.text
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)  # another thread count is another machine key
    cpu_matmul.clear_decisions()
    assert not cpu_matmul.use_onednn() and probes == [1, 2]
    assert len(json.loads((tmp_path / "cpu_matmul.json").read_text())) == 2
    cpu_matmul.clear_decisions()


def test_the_decode_probe_decides_packed_weights_beside_the_other_decision(monkeypatch, tmp_path, caplog):
    """The decode's own decision is probed once and kept in the same machine entry; the settings force it."""
    if cpu_matmul._reorder_op() is None:
        pytest.skip("this torch build cannot pack weights for oneDNN")
    default_s, packed_s = cpu_matmul.probe_decode(repeats=1)
    assert default_s > 0 and packed_s > 0
    monkeypatch.setenv(cpu_matmul.ENV, "auto")
    monkeypatch.setenv("R1_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_matmul, "probe", lambda: (1.0, 1.0))  # oneDNN no faster on the other products
    monkeypatch.setattr(cpu_matmul, "probe_decode", lambda: (0.3, 0.2))  # 1.5x on the decode's
    cpu_matmul.clear_decisions()
    with caplog.at_level(logging.INFO, logger=cpu_matmul.__name__):
        assert not cpu_matmul.use_onednn() and cpu_matmul.use_packed_decode()
    assert "float32 decode products: oneDNN on packed weights (probe: oneDNN 200.00 ms, default BLAS 300.00 ms" in caplog.text
    weight = torch.randn(4, 8)
    assert cpu_matmul.packed_eligible(weight) and not cpu_matmul.eligible(weight)
    assert not cpu_matmul.packed_eligible(weight.double())
    kept = json.loads((tmp_path / "cpu_matmul.json").read_text())
    assert kept == {cpu_matmul.machine_key(): {
        "onednn": False, "onednn_ms": 1000.0, "default_ms": 1000.0,
        "decode_packed": True, "decode_packed_ms": 200.0, "decode_default_ms": 300.0,
    }}
    monkeypatch.setattr(cpu_matmul, "probe_decode", lambda: pytest.fail("probed over a kept decision"))
    cpu_matmul.clear_decisions()
    assert cpu_matmul.use_packed_decode()
    for setting, expected in (("default", False), ("onednn", True)):
        monkeypatch.setenv(cpu_matmul.ENV, setting)
        cpu_matmul.clear_decisions()
        assert cpu_matmul.use_packed_decode() is expected
    cpu_matmul.clear_decisions()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", r'expected \{"<machine>": \{"onednn": true\|false, ...\}\}'),
        ('{"cpu": {"onednn": "yes"}}', r'expected \{"<machine>"'),
        ('{"cpu": {"decode_packed": 1}}', r'expected \{"<machine>"'),
        ('{"cpu": {}}', r'expected \{"<machine>"'),
        ('{"cpu": ', r"cpu_matmul.json:1:9: not JSON"),
    ],
)
def test_a_bad_kept_decision_is_refused_by_name(monkeypatch, tmp_path, content, message):
    monkeypatch.setenv(cpu_matmul.ENV, "auto")
    monkeypatch.setenv("R1_LIGHTNING_CACHE", str(tmp_path))
    (tmp_path / "cpu_matmul.json").write_text(content)
    monkeypatch.setattr(cpu_matmul, "probe", lambda: pytest.fail("probed over a bad file"))
    with pytest.raises(ConfigError, match=message):
        cpu_matmul.check()
    if cpu_matmul._onednn_op() is not None:
        cpu_matmul.clear_decisions()
        with pytest.raises(ConfigError, match=message):
            cpu_matmul.use_onednn()
        cpu_matmul.clear_decisions()


def test_an_unwritable_cache_costs_a_probe_not_the_run(monkeypatch, tmp_path, caplog):
    if cpu_matmul._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear op")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(cpu_matmul.ENV, "auto")
    monkeypatch.setenv("R1_LIGHTNING_CACHE", str(tmp_path / "file" / "below"))  # a directory under a file
    monkeypatch.setattr(cpu_matmul, "probe", lambda: (1.0, 0.5))
    cpu_matmul.clear_decisions()
    with caplog.at_level(logging.WARNING, logger=cpu_matmul.__name__):
        assert cpu_matmul.use_onednn()
    assert "could not keep the R1_CPU_MATMUL decision" in caplog.text and "each process will probe again" in caplog.text
    cpu_matmul.clear_decisions()


def test_chunked_head_gradients_in_weight_blocks(backend, monkeypatch):
    """The head's weight gradient accumulated in vocabulary blocks (7 rows, 3 chunks of rows) equals float64's."""
    monkeypatch.setattr("r1_lightning.engines.logprobs.WEIGHT_GRAD_BLOCK", 7)
    (h, w), (hf, wf) = _float64_twins((10, 16), (23, 16), seed=2)
    targets = torch.randint(0, 23, (10,), generator=torch.Generator().manual_seed(3))
    exact, _ = chunked_token_logprobs(h, w, targets, chunk_size=4)
    ours, _ = chunked_token_logprobs(hf, wf, targets, chunk_size=4)
    grad = torch.randn(10, dtype=torch.float64)
    exact.backward(grad)
    ours.backward(grad.float())
    assert _relative(ours, exact) < 2e-6
    assert _relative(hf.grad, h.grad) < 2e-6 and _relative(wf.grad, w.grad) < 2e-6


def test_training_log_probs_agree_across_backends(monkeypatch, tiny_model_dir):
    """The same model's token log-probs and gradients under oneDNN and under aten, to float32 rounding."""
    if cpu_matmul._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear op")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, model.config.vocab_size, (4, 24), generator=generator)
    ids[1] = ids[0]  # two rows sharing everything, the others not
    mask = torch.ones_like(ids)
    positions = torch.arange(24).expand(4, 24)
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[:, 10:] = True
    results = {}
    for choice in ("default", "onednn"):
        monkeypatch.setenv(cpu_matmul.ENV, choice)
        cpu_matmul.clear_decisions()
        model.zero_grad()
        logprobs, _ = token_logprobs(model, ids, mask, positions, targets, prompt_length=10)
        logprobs.sum().backward()
        results[choice] = logprobs.detach(), [p.grad.clone() for p in model.parameters()]
    cpu_matmul.clear_decisions()
    (lp_a, grads_a), (lp_b, grads_b) = results["default"], results["onednn"]
    torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=1e-5)
    assert lp_a[:, 10:].abs().sum() > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
