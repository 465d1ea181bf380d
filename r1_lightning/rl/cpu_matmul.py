"""Float32 matrix products on CPU through oneDNN where this CPU runs them faster than the default BLAS.

PyTorch's CPU build sends float32 `mm` and `F.linear` to MKL. On AMD EPYC (Zen 4), measured on
this project's 2-core VM with one thread, MKL's sgemm ran at 70-90 GFLOP/s on the training
forward's shapes and 20-50 at decode's 8 rows, while oneDNN, which PyTorch ships beside it (the
`mkldnn` ops inductor uses), ran the same float32 products at 130-190 and 40-55: MKL takes a
slower code path on CPUs that are not Intel's. Both are IEEE float32 with float32 accumulation;
the results differ by summation order only (~1e-6 relative, as MKL's own do between shapes).

Which one runs is decided once per process (`use_onednn`): `R1_CPU_MATMUL=onednn` or `default`
forces it; otherwise (`auto`) a probe of ~0.1 s times both on two shapes (decode-like and
training-like) and takes oneDNN only where it is at least 10% faster, with one log line. The
probe's decision is kept per machine (`decision_file`: CPU model, torch version, threads) and
read back by every later process: on a CPU where the two run within the probe's noise of each
other, processes deciding afresh would flip between them, and a resumed run (or a second rank)
would then round differently from the run it continues. The project's own hot paths call `mm_nt`
(the fast decode step, the chunked LM head) or run under `onednn_linears()` (the training
forwards: every eligible `F.linear`, forward and backward).

The fast decode step has a second decision of its own (`use_packed_decode`): its few rows per product
read every weight from memory at every token, and oneDNN on weights reordered once into its own blocked
layout (`pack_nt`, `mm_packed`: no per-product packing of the weight) ran them 1.4-1.5x faster than MKL
on the AVX2-only AMD EPYC VM where plain oneDNN was no faster (8 rows, SmolLM2's layer shapes). Its
probe times MKL and the packed product on decode-like products over more weight than a CPU cache holds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from r1_lightning.atomic import write_text_atomic
from r1_lightning.cache import cache_root
from r1_lightning.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "R1_CPU_MATMUL"
CHOICES = ("auto", "onednn", "default")
# The decisions a machine's entry in `decision_file` keeps (each a bool; timings beside them).
DECISIONS = ("onednn", "decode_packed")
# oneDNN must be this much faster on the probe to be taken: within it, the default is kept.
MIN_SPEEDUP = 1.1
# (rows, in, out) of the probe: a decode step's few rows and a training forward's many.
PROBE_SHAPES = ((8, 576, 1536), (512, 576, 1536))
# (rows, in, out, weights) of the decode probe: a decode step's few rows over 56 MB of weights, more than a CPU's
# last-level cache holds, as a model's layers stream from memory at every token.
DECODE_PROBE = (8, 576, 1536, 16)


def _onednn_op():
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    return op if op is not None and torch.backends.mkldnn.is_available() else None


def _reorder_op():
    op = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
    return op if _onednn_op() is not None else None


def _ieee_float32() -> bool:
    """oneDNN would compute in float32: the user has not allowed it bf16/tf32 for float32 products."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(matmul, "fp32_precision", "none") in ("none", "ieee")


def setting() -> str:
    """`R1_CPU_MATMUL` as one of `CHOICES` (unset or empty: ``auto``).

    Raises:
        ConfigError: ``R1_CPU_MATMUL`` is set to anything else.
    """
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: choose one of {', '.join(CHOICES)}")
    return choice


def check() -> None:
    """Refuse a bad `R1_CPU_MATMUL` or a bad kept-decision file now, before any work, rather than mid-training.

    Raises:
        ConfigError: either is not what `use_onednn` accepts.
    """
    if setting() == "auto":
        _read_decisions(decision_file())


@functools.cache
def use_onednn() -> bool:
    """Whether float32 CPU products go through oneDNN in this process (`R1_CPU_MATMUL`, else a probe).

    Raises:
        ConfigError: ``R1_CPU_MATMUL`` is not one of ``auto``, ``onednn``, ``default``.
    """
    chosen, source = _decide("onednn", _onednn_op() is not None, probe, ("onednn_ms", "default_ms"))
    if source is not None:
        log.info("float32 CPU matmuls: %s (%s; %s=default|onednn to choose)", "oneDNN" if chosen else "the default BLAS", source, ENV)
    return chosen


@functools.cache
def use_packed_decode() -> bool:
    """Whether the fast decode step's float32 products run through oneDNN on weights packed once per ``generate``
    (`pack_nt`, `mm_packed`): ``R1_CPU_MATMUL=onednn`` yes, ``default`` no, ``auto`` the decode probe's pick
    (`probe_decode`; kept per machine like `use_onednn`'s).

    Raises:
        ConfigError: ``R1_CPU_MATMUL`` is not one of ``auto``, ``onednn``, ``default``.
    """
    chosen, source = _decide("decode_packed", _reorder_op() is not None, probe_decode, ("decode_packed_ms", "decode_default_ms"))
    if source is not None:
        log.info(
            "float32 decode products: %s (%s; %s=default|onednn to choose)",
            "oneDNN on packed weights" if chosen else "as the other products", source, ENV,
        )
    return chosen


def clear_decisions() -> None:
    """Forget this process's decisions (`use_onednn`, `use_packed_decode`): the next products read
    `R1_CPU_MATMUL` and the kept file again (for tests, and code that changes the variable)."""
    use_onednn.cache_clear()
    use_packed_decode.cache_clear()


def _decide(name: str, available: bool, run_probe, timing_names: tuple[str, str]) -> tuple[bool, str | None]:
    """Decision ``name``: `R1_CPU_MATMUL`'s where it forces one (or no, where oneDNN is not ``available`` or not
    IEEE float32), else this machine's kept one or the probe's (oneDNN at least `MIN_SPEEDUP` faster), then kept;
    and, for the latter two, where it came from for the log line."""
    choice = setting()
    if choice == "default" or not available or not _ieee_float32():
        return False, None
    if choice == "onednn":
        return True, None
    path, key = decision_file(), machine_key()
    decisions = _read_decisions(path)
    entry = decisions.setdefault(key, {})
    if name in entry:
        return entry[name], f"this machine's probe, kept in {path}; delete it to probe again"
    default_s, onednn_s = run_probe()
    chosen = default_s >= MIN_SPEEDUP * onednn_s
    entry.update({name: chosen, timing_names[0]: round(onednn_s * 1e3, 3), timing_names[1]: round(default_s * 1e3, 3)})
    _write_decisions(path, decisions)
    return chosen, f"probe: oneDNN {onednn_s * 1e3:.2f} ms, default BLAS {default_s * 1e3:.2f} ms"


def decision_file() -> Path:
    """Where `auto` keeps its probe decisions: ``$R1_LIGHTNING_CACHE/cpu_matmul.json`` (default ``~/.cache/r1_lightning``)."""
    return cache_root() / "cpu_matmul.json"


def machine_key() -> str:
    """What the decision depends on: the CPU model, the torch build and this process's thread count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _read_decisions(path: Path) -> dict[str, dict]:
    """The kept decisions, checked: a file that is not what `_write_decisions` writes is refused, by name.

    Raises:
        ConfigError: the file is not a JSON object of ``{"onednn": bool, ...}`` entries.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # nothing kept yet (or no cache directory can exist there)
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the kept {ENV} decisions ({error}); delete it to probe again") from None
    try:
        decisions = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path}:{error.lineno}:{error.colno}: not JSON ({error.msg}); delete it to probe again"
        ) from None
    if not isinstance(decisions, dict) or not all(
        isinstance(entry, dict) and entry and all(isinstance(entry.get(name, False), bool) for name in DECISIONS)
        for entry in decisions.values()
    ):
        raise ConfigError(f'{path}: expected {{"<machine>": {{"onednn": true|false, ...}}}}; delete it to probe again')
    return decisions


def _write_decisions(path: Path, decisions: dict[str, dict]) -> None:
    """Write atomically (`atomic.write_text_atomic`); an unwritable cache only costs a probe per process."""
    try:
        write_text_atomic(path, json.dumps(decisions, indent=1, sort_keys=True))
    except OSError as error:
        log.warning("could not keep the %s decision in %s (%s): each process will probe again", ENV, path, error)


def probe(repeats: int = 5) -> tuple[float, float]:
    """Seconds of the default `x @ W.T` and of oneDNN's on `PROBE_SHAPES` (each the best of `repeats`, alternated)."""
    op = _onednn_op()
    generator = torch.Generator().manual_seed(0)
    default_s = onednn_s = 0.0
    for rows, inputs, outputs in PROBE_SHAPES:
        x = torch.randn(rows, inputs, generator=generator)
        w = torch.randn(outputs, inputs, generator=generator)
        best = [float("inf"), float("inf")]
        for _ in range(repeats):
            for i, run in enumerate((lambda: x @ w.T, lambda: op(x, w, None, "none", [], ""))):
                start = time.perf_counter()
                run()
                best[i] = min(best[i], time.perf_counter() - start)
        default_s, onednn_s = default_s + best[0], onednn_s + best[1]
    return default_s, onednn_s


def probe_decode(repeats: int = 3) -> tuple[float, float]:
    """Seconds of the default `x @ W.T` and of `mm_packed` on `DECODE_PROBE`'s weights (each the best of `repeats`
    passes over all of them, alternated). Packing itself is left out: a ``generate`` call packs once for all its tokens."""
    rows, inputs, outputs, count = DECODE_PROBE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inputs, generator=generator)
    weights = [torch.randn(outputs, inputs, generator=generator) for _ in range(count)]
    packed = [pack_nt(w, rows) for w in weights]
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, run in enumerate((lambda: [x @ w.T for w in weights], lambda: [mm_packed(x, p) for p in packed])):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def pack_nt(weight: Tensor, rows: int) -> Tensor:
    """`weight [N, K]` reordered into oneDNN's blocked layout for products `x [rows, K] @ weight.T` (`mm_packed`): a
    copy, opaque to everything else. ``rows`` is a hint; other row counts give the same values."""
    return _reorder_op()(weight.detach().contiguous(), rows)


def mm_packed(a: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """`a @ weight.T (+ bias)` for 2-D float32 `a [M, K]` and `packed = pack_nt(weight, ...)` (no autograd)."""
    return _onednn_op()(_dense(a), packed, bias, "none", [], "")


def eligible(*tensors: Tensor | None) -> bool:
    """Plain float32 CPU tensors (no subclass such as DTensor), outside autocast, and oneDNN chosen."""
    present = [t for t in tensors if t is not None]
    return _plain_float32(present) and use_onednn()


def packed_eligible(*tensors: Tensor | None) -> bool:
    """As `eligible`, for the fast decode step's packed weights (`use_packed_decode`)."""
    return _plain_float32([t for t in tensors if t is not None]) and use_packed_decode()


def _plain_float32(tensors: list[Tensor]) -> bool:
    return (
        all(type(t) in (Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and not torch.is_autocast_enabled("cpu")
    )


def mm_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """`a @ b.T (+ bias)` for 2-D `a [M, K]`, `b [N, K]` (no autograd): oneDNN where `eligible`, else aten."""
    if not eligible(a, b, bias):
        return a @ b.T if bias is None else torch.addmm(bias, a, b.T)
    return _onednn_op()(_dense(a), _dense(b), bias, "none", [], "")


def _dense(t: Tensor) -> Tensor:
    """`t`, or a contiguous copy: oneDNN takes row-major matrices and their transposes, not other strides."""
    return t if t.is_contiguous() or t.T.is_contiguous() else t.contiguous()


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` on 2-D input with all three products (output, input gradient, weight gradient) through oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return mm_nt(x, weight, bias)  # [M, N]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = mm_nt(grad, weight.T) if ctx.needs_input_grad[0] else None  # [M, K] = grad @ W
        grad_weight = mm_nt(grad.T, x.T) if ctx.needs_input_grad[1] else None  # [N, K] = grad.T @ x
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None  # [N]
        return grad_x, grad_weight, grad_bias


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:  # noqa: A002 (F.linear's names)
    """`F.linear(x, weight, bias)`, differentiable, through oneDNN where `eligible`."""
    if not eligible(input, weight, bias) or weight.dim() != 2 or input.dim() == 0:
        return F.linear(input, weight, bias)
    out = _OneDNNLinear.apply(input.reshape(-1, input.shape[-1]), weight, bias)  # [M, N]
    return out.view(*input.shape[:-1], weight.shape[0])


class _Linears(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        return func(*args, **kwargs)


# How many `onednn_linears()` this thread is inside (`checkpoint_contexts` reads it).
_inside = threading.local()


@contextlib.contextmanager
def onednn_linears() -> Iterator[None]:
    """Inside, every `F.linear` (so every `nn.Linear`) on plain float32 CPU tensors runs `linear`; a no-op
    where oneDNN is not chosen. For eager forwards only: not for code `torch.compile` traces."""
    if not use_onednn():
        yield
        return
    _inside.depth = getattr(_inside, "depth", 0) + 1
    try:
        with _Linears():
            yield
    finally:
        _inside.depth -= 1


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`torch.utils.checkpoint`'s `context_fn`: the forward as it is, and the recompute in the backward under
    `onednn_linears()` where the forward ran under it. The backward runs after the forward's `with` has closed, so
    without this the recompute would run MKL's products where the forward ran oneDNN's: other saved tensors, which
    non-reentrant checkpointing refuses (`CheckpointError`: different metadata)."""
    inside = getattr(_inside, "depth", 0) > 0
    return contextlib.nullcontext(), (_Linears() if inside else contextlib.nullcontext())
