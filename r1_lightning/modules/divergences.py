"""Per-token divergences between a teacher's and a student's next-token distributions, chunked over tokens.

With p_T (teacher) and p_S (student) softened by a temperature τ, p = softmax(z / τ):

- forward KL, KL(p_T ‖ p_S) = Σ_v p_T (log p_T - log p_S): mean-seeking, the student must cover
  every token the teacher likes (soft targets, Hinton et al. 2015, https://arxiv.org/abs/1503.02531).
- reverse KL, KL(p_S ‖ p_T) = Σ_v p_S (log p_S - log p_T): mode-seeking (MiniLLM,
  https://arxiv.org/abs/2306.08543).
- generalised Jensen–Shannon (GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649):
  JSD(β) = β·KL(p_T ‖ M) + (1-β)·KL(p_S ‖ M) with M = β·p_T + (1-β)·p_S. β = ½ is the usual
  symmetric JSD (≤ ln 2). JSD(β) itself goes to 0 at both ends, but JSD(β)/β → KL(p_T ‖ p_S) as
  β → 0 and JSD(β)/(1-β) → KL(p_S ‖ p_T) as β → 1; we implement the ends as those limits (as TRL's
  GKDTrainer does): β = 0 *is* forward KL and β = 1 *is* reverse KL. (So JSD is not continuous at
  the ends: JSD(ε) ≈ ε·KL(p_T ‖ p_S).)

`distillation_loss` multiplies the token mean by τ², which keeps the gradient's size independent of
τ (the gradient of a τ-softened KL shrinks as 1/τ², Hinton et al. section 2.1).

Top-k teacher: the teacher keeps its `k` largest logits per position and is renormalised over them,
p_T^k(v) = exp(z_v/τ) / Σ_{u ∈ K} exp(z_u/τ) for v in K, 0 elsewhere; the student keeps its whole
vocabulary. The approximation: the teacher's tail mass 1 - Σ_K p_T is dropped and its top-k mass
scaled up, so the student is pushed to put all of its mass on K (forward KL) or on M's support
(JSD). Forward KL and JSD with β < 1 are then exact for p_T^k; reverse KL (and JSD at β = 1) would be
infinite wherever the student puts mass outside K, so top-k refuses them.

Memory: `chunked_divergence` projects both models' final hidden states through their LM heads
`chunk_size` rows at a time (as `r1_lightning.engines.logprobs` does for one model): forward and backward
hold a handful of `[chunk_size, V]` float32 buffers, never `[tokens, V]` logits of either model.
The backward recomputes each chunk's logits of both models and applies the closed-form gradient of
the divergence with respect to the student's logits (below, per class). `naive_divergence` is the
reference for tests: full logits, probabilities, autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from r1_lightning.rl.logits import chunk_logits, compute_dtype
from r1_lightning.rl.masked import masked_mean


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """p · (log p - log q) elementwise, with 0 · log 0 = 0 where p is exactly 0 (a top-k teacher)."""
    return torch.where(log_p == -math.inf, 0.0, log_p.exp() * (log_p - log_q))  # [C, V]


class Divergence:
    """D(teacher, student) per row of next-token log-probs, and its gradient wrt the student's logits.

    Subclasses set `name` (logged as `train/<name>`) and implement `__call__` and `grad`. Both get
    the log-softmax of the temperature-scaled logits `s = z / τ`, `[C, V]`; the teacher's are
    `-inf` outside its top-k when `top_k` is on.
    """

    name: str = "divergence"
    #: True when the value is infinite against a teacher that is 0 outside its top-k.
    needs_full_teacher: bool = False

    def __call__(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        """`[C]` divergence of each row."""
        raise NotImplementedError

    def grad(self, student_logp: Tensor, teacher_logp: Tensor, value: Tensor) -> Tensor:
        """`[C, V]` d value / d s (s = student logits / τ); `value` is `__call__`'s result."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ForwardKL(Divergence):
    """KL(p_T ‖ p_S). d/ds_v = p_S(v) - p_T(v) (the soft-target cross-entropy gradient)."""

    name = "forward_kl"

    def __call__(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return _kl_terms(teacher_logp, student_logp).sum(-1)  # [C]

    def grad(self, student_logp: Tensor, teacher_logp: Tensor, value: Tensor) -> Tensor:
        return student_logp.exp() - teacher_logp.exp()  # [C, V]


class ReverseKL(Divergence):
    """KL(p_S ‖ p_T). d/ds_v = p_S(v) · (log p_S(v) - log p_T(v) - KL)."""

    name = "reverse_kl"
    needs_full_teacher = True

    def __call__(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return _kl_terms(student_logp, teacher_logp).sum(-1)  # [C]

    def grad(self, student_logp: Tensor, teacher_logp: Tensor, value: Tensor) -> Tensor:
        return student_logp.exp() * (student_logp - teacher_logp - value[:, None])  # [C, V]


class GeneralizedJSD(Divergence):
    """β·KL(p_T ‖ M) + (1-β)·KL(p_S ‖ M), M = β·p_T + (1-β)·p_S; β = 0 / 1 are forward / reverse KL.

    Gradient: with a = d JSD / d p_S(v) = (1-β)·log(p_S(v) / M(v)) (the p_T and p_S terms through M
    cancel), d/ds_v = p_S(v)·(a_v - Σ_u p_S(u) a_u) = (1-β)·p_S(v)·(log p_S(v) - log M(v) - KL(p_S ‖ M)).

    Args:
        beta: Weight of the teacher in the mixture M, in [0, 1].
    """

    name = "jsd"

    def __init__(self, beta: float = 0.5) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta={beta} must be in [0, 1]")
        self.beta = float(beta)
        self.needs_full_teacher = self.beta == 1.0
        # The ends are the limits of JSD(β)/β and JSD(β)/(1-β): forward and reverse KL (module docstring).
        self._end = ForwardKL() if self.beta == 0.0 else ReverseKL() if self.beta == 1.0 else None

    def _log_mixture(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return torch.logaddexp(teacher_logp + math.log(self.beta), student_logp + math.log1p(-self.beta))  # [C, V] log M

    def __call__(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        if self._end is not None:
            return self._end(student_logp, teacher_logp)
        log_m = self._log_mixture(student_logp, teacher_logp)
        teacher_kl = _kl_terms(teacher_logp, log_m).sum(-1)  # [C]
        student_kl = _kl_terms(student_logp, log_m).sum(-1)  # [C]
        return self.beta * teacher_kl + (1.0 - self.beta) * student_kl

    def grad(self, student_logp: Tensor, teacher_logp: Tensor, value: Tensor) -> Tensor:
        if self._end is not None:
            return self._end.grad(student_logp, teacher_logp, value)
        log_ratio = student_logp - self._log_mixture(student_logp, teacher_logp)  # [C, V] log p_S/M
        q = student_logp.exp()  # [C, V]
        student_kl = (q * log_ratio).sum(-1, keepdim=True)  # [C, 1] KL(p_S ‖ M)
        return log_ratio.sub_(student_kl).mul_(q).mul_(1.0 - self.beta)  # [C, V]

    def __repr__(self) -> str:
        return f"GeneralizedJSD(beta={self.beta})"


DIVERGENCES: dict[str, type[Divergence]] = {"forward_kl": ForwardKL, "reverse_kl": ReverseKL, "jsd": GeneralizedJSD}


def resolve_divergence(spec: str | Divergence, jsd_beta: float = 0.5) -> Divergence:
    """`forward_kl` / `reverse_kl` / `jsd` (with `jsd_beta`), or a `Divergence` instance returned as is."""
    if isinstance(spec, Divergence):
        return spec
    if spec == "jsd":
        return GeneralizedJSD(jsd_beta)
    if spec in DIVERGENCES:
        return DIVERGENCES[spec]()
    raise ValueError(f"divergence {spec!r} is not one of {sorted(DIVERGENCES)} (or a Divergence)")


def top_k_log_softmax(logits: Tensor, top_k: int) -> Tensor:
    """log_softmax over each row's `top_k` largest logits; `-inf` elsewhere. `[C, V]` → `[C, V]`."""
    values, index = logits.topk(top_k, dim=-1)  # [C, k]
    return torch.full_like(logits, -math.inf).scatter_(-1, index, torch.log_softmax(values, dim=-1))


def _chunk_logprobs(student, teacher, rows: slice, temperature: float, top_k: int) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs `[C, V]` of `rows`; each `(hidden, weight, bias)` is already in the compute dtype."""
    s_hidden, s_weight, s_bias = student
    t_hidden, t_weight, t_bias = teacher
    student_logp = torch.log_softmax(chunk_logits(s_hidden[rows], s_weight, s_bias, temperature), dim=-1)  # [C, V]
    teacher_logits = chunk_logits(t_hidden[rows], t_weight, t_bias, temperature)  # [C, V]
    teacher_logp = top_k_log_softmax(teacher_logits, top_k) if top_k else torch.log_softmax(teacher_logits, dim=-1)
    return student_logp, teacher_logp


def _head(weight: Tensor, bias: Tensor | None, vocab_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The first `vocab_size` rows of an LM head in the compute dtype (rows past the tokenizer are padding)."""
    return weight[:vocab_size].to(dtype), (bias[:vocab_size].to(dtype) if bias is not None else None)


class _ChunkedDivergence(torch.autograd.Function):
    """Forward keeps no logits (saves the inputs only); backward recomputes both models' logits per chunk."""

    @staticmethod
    def forward(
        ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, divergence, temperature, top_k, vocab_size, chunk_size
    ):
        dtype = compute_dtype(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        student = (s_hidden, *_head(s_weight, s_bias, vocab_size, dtype))
        teacher = (t_hidden, *_head(t_weight, t_bias, vocab_size, dtype))
        values = s_hidden.new_empty(s_hidden.shape[0], dtype=dtype)  # [M]
        agree = torch.empty(s_hidden.shape[0], dtype=torch.bool, device=s_hidden.device)  # [M]
        with torch.autocast(s_hidden.device.type, enabled=False):
            for start in range(0, s_hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                student_logp, teacher_logp = _chunk_logprobs(student, teacher, rows, temperature, top_k)
                values[rows] = divergence(student_logp, teacher_logp)
                agree[rows] = student_logp.argmax(-1) == teacher_logp.argmax(-1)  # τ and top-k keep the argmax
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, values)
        ctx.options = (divergence, temperature, top_k, vocab_size, chunk_size)
        ctx.mark_non_differentiable(agree)
        return values, agree

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values, grad_agree):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, values = ctx.saved_tensors
        divergence, temperature, top_k, vocab_size, chunk_size = ctx.options
        dtype = values.dtype
        student = (s_hidden, *_head(s_weight, s_bias, vocab_size, dtype))
        teacher = (t_hidden, *_head(t_weight, t_bias, vocab_size, dtype))
        g = grad_values.to(dtype) / temperature  # [M]; ds/dz = 1/τ
        grad_hidden = torch.empty_like(s_hidden) if ctx.needs_input_grad[0] else None  # [M, H]
        # Gradient accumulators over the whole head: rows past `vocab_size` (padding) get zeros.
        grad_w = s_weight.new_zeros(s_weight.shape, dtype=dtype) if ctx.needs_input_grad[1] else None  # [V_S, H]
        grad_b = s_bias.new_zeros(s_bias.shape, dtype=dtype) if s_bias is not None and ctx.needs_input_grad[2] else None
        with torch.autocast(s_hidden.device.type, enabled=False):
            for start in range(0, s_hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                student_logp, teacher_logp = _chunk_logprobs(student, teacher, rows, temperature, top_k)
                grad_logits = divergence.grad(student_logp, teacher_logp, values[rows]).mul_(g[rows, None])  # [C, V]
                del student_logp, teacher_logp
                if grad_w is not None:
                    grad_w[:vocab_size].addmm_(grad_logits.T, s_hidden[rows].to(dtype))  # [V, H]
                if grad_b is not None:
                    grad_b[:vocab_size] += grad_logits.sum(0)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ student[1]  # [C, H]
        grad_w = grad_w.to(s_weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(s_bias.dtype) if grad_b is not None else None
        return grad_hidden, grad_w, grad_b, None, None, None, None, None, None, None, None


def chunked_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    divergence: Divergence,
    temperature: float = 1.0,
    top_k: int = 0,
    vocab_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Per-token D(p_T, p_S) of softened next-token distributions, chunked over tokens.

    Equals `naive_divergence(student_hidden @ student_weight.T + b, teacher_hidden @ teacher_weight.T + b, ...)`
    in value and gradient (wrt the student's hidden states, weight and bias; the teacher gets none),
    holding only `chunk_size`-row logits at a time, forward and backward.

    Args:
        student_hidden: The student's final hidden states at the positions that predict the
            completion tokens, `[M, H_S]`.
        student_weight: The student's LM head, `[V_S, H_S]`.
        teacher_hidden: The teacher's, at the same positions, `[M, H_T]` (no gradient).
        teacher_weight: The teacher's LM head, `[V_T, H_T]`.
        divergence: A `Divergence` (`ForwardKL()`, `ReverseKL()`, `GeneralizedJSD(beta)`).
        temperature: τ; both models' logits are divided by it.
        top_k: Keep the teacher's `top_k` logits per position, renormalised (0 = all).
        vocab_size: The shared tokenizer's size V; both heads are cut to their first V rows, so
            embedding padding (e.g. 152064 vs 151936 rows for 151665 tokens) never enters the
            softmax. Default: the smaller head.
        student_bias: The student's head bias, `[V_S]`, if any.
        teacher_bias: The teacher's head bias, `[V_T]`, if any.
        chunk_size: Rows per chunk.

    Returns:
        `[M]` float32 divergences (not multiplied by τ²: see `distillation_loss`), and `[M]` bool
        agreement of the two models' argmax tokens (no gradient).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    same_rows = student_hidden.shape[0] == teacher_hidden.shape[0]
    if not same_rows or student_hidden.shape[-1] != student_weight.shape[-1] or teacher_hidden.shape[-1] != teacher_weight.shape[-1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} / weight {tuple(student_weight.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} / weight {tuple(teacher_weight.shape)} must be [M, H_S], [V_S, H_S], "
            "[M, H_T], [V_T, H_T]"
        )
    vocab_size = vocab_size or min(student_weight.shape[0], teacher_weight.shape[0])
    if vocab_size > min(student_weight.shape[0], teacher_weight.shape[0]):
        rows = f"{student_weight.shape[0]} / {teacher_weight.shape[0]}"
        raise ValueError(f"vocab_size={vocab_size} exceeds an LM head ({rows} rows)")
    if top_k and divergence.needs_full_teacher:
        raise ValueError(
            f"top_k={top_k} cannot be used with {divergence!r}: it is infinite against a teacher that is 0 outside its top-k"
        )
    top_k = min(int(top_k), vocab_size)
    return _ChunkedDivergence.apply(
        student_hidden, student_weight, student_bias, teacher_hidden.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), divergence, float(temperature), top_k, vocab_size, chunk_size,
    )


def distillation_loss(
    per_token: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """τ² · the token mean of a per-token divergence (Hinton's scaling), and the unscaled mean as a metric.

    Args:
        per_token: `[M]` divergences of the completion tokens, or `[B, T]` with a `mask`.
        temperature: τ the distributions were softened with.
        mask: `[B, T]`, true on completion tokens (default: every entry counts).
    """
    divergence = per_token.mean() if mask is None else masked_mean(per_token, mask)
    return temperature**2 * divergence, {"divergence": divergence.detach()}


def naive_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    name: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
    vocab_size: int | None = None,
) -> Tensor:
    """The reference: full `[M, V]` probabilities and autograd, straight from the definitions.

    Args:
        student_logits: `[M, V_S]`.
        teacher_logits: `[M, V_T]`.
        name: `forward_kl`, `reverse_kl` or `jsd` (β = 0 / 1: forward / reverse KL, the limits).
    """
    vocab_size = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits[..., :vocab_size].to(dtype) / temperature  # [M, V]
    t = teacher_logits[..., :vocab_size].to(dtype) / temperature  # [M, V]
    if top_k:
        threshold = t.topk(top_k, dim=-1).values[..., -1:]  # [M, 1]
        t = t.masked_fill(t < threshold, -math.inf)
    q, p = torch.softmax(s, dim=-1), torch.softmax(t, dim=-1)  # student, teacher (0 outside the top-k)
    if name == "jsd" and beta in (0.0, 1.0):
        name = "forward_kl" if beta == 0.0 else "reverse_kl"
    if name == "forward_kl":
        return (torch.xlogy(p, p) - p * torch.log(q)).sum(-1)
    if name == "reverse_kl":
        return (torch.xlogy(q, q) - q * torch.log(p)).sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        teacher_kl = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
        return beta * teacher_kl + (1 - beta) * (torch.xlogy(q, q) - q * torch.log(m)).sum(-1)
    raise ValueError(f"unknown divergence {name!r}")
