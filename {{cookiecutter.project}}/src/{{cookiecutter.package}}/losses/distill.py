"""Knowledge-distillation loss (Hinton et al. 2015) for language models, computed in chunks of tokens.

    L = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)

`teacher_T = softmax(teacher / T)`, `student_T = softmax(student / T)`. The T^2 factor keeps the
gradient of the KL term on the same scale as the CE term when T changes (the soft-target gradient
shrinks as 1/T^2). `kind="reverse"` swaps the KL's arguments, KL(student_T || teacher_T): mode
seeking instead of mass covering, the other choice LLM-distillation papers compare.

Memory. Logits are (tokens, vocab), and with a 50K vocabulary one float32 copy of them is as large
as a small model. Autograd would keep several such copies alive until backward (softmaxes, logs,
differences). Here the loss is a custom autograd Function: the forward pass keeps nothing but the
input logits (no copy), and both passes walk over `chunk_size` tokens at a time, recomputing the
softmaxes of one chunk in float32. Working memory is therefore bounded by the chunk, whatever the
number of tokens: at most three float32 [chunk_size, vocab] blocks are alive at once (two
log-distributions and one temporary), plus the gradient of the student logits, which backward
produces for any loss. The gradient is written chunk by chunk into one preallocated tensor.

Speed. On GPUs each chunk's forward and gradient are torch.compile'd: Inductor fuses the softmaxes,
the KL, the CE and the masking into a few passes over the bf16 logits, and the float32 blocks above
never reach memory. On CPUs (and in float64) the same functions run eagerly.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("forward", "reverse")


def _scaled(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """(c, V) logits / T, computed in `dtype` (bf16 logits are upcast before dividing, not after)."""
    x = logits.to(dtype)
    return x if temperature == 1.0 else x / temperature


def _kl_rows(student: Tensor, teacher: Tensor, temperature: float, reverse: bool, dtype: torch.dtype) -> Tensor:
    """Per-token KL at temperature T over the first V columns. (c, V), (c, V) -> (c,).

    At most three [c, V] blocks alive: the two log-distributions, then the weights, with the difference
    and the product computed in place (F.kl_div would allocate two more temporaries).
    """
    log_q = torch.log_softmax(_scaled(student, temperature, dtype), dim=-1)  # student, log q
    log_p = torch.log_softmax(_scaled(teacher, temperature, dtype), dim=-1)  # teacher, log p
    if reverse:  # sum_v q (log q - log p)
        weight, diff = log_q.exp(), log_q.sub_(log_p)
    else:  # sum_v p (log p - log q)
        weight, diff = log_p.exp(), log_p.sub_(log_q)
    del log_q, log_p  # `diff` holds one of the two blocks; the other is freed here
    return weight.mul_(diff).sum(-1)


def _kl_grad(student: Tensor, teacher: Tensor, temperature: float, reverse: bool, dtype: torch.dtype) -> Tensor:
    """d KL_row / d student logits (the 1/T of s/T included), for the first V columns: (c, V).

    forward KL(p || q): (q - p) / T.   reverse KL(q || p): q * (log q - log p - KL_row) / T.
    """
    if not reverse:
        q = torch.softmax(_scaled(student, temperature, dtype), dim=-1)
        grad = q.sub_(torch.softmax(_scaled(teacher, temperature, dtype), dim=-1))
    else:
        log_q = torch.log_softmax(_scaled(student, temperature, dtype), dim=-1)
        diff = log_q - torch.log_softmax(_scaled(teacher, temperature, dtype), dim=-1)  # log q - log p
        q = log_q.exp_()  # in log_q's block
        kl = (q * diff).sum(-1, keepdim=True)  # (c, 1)
        grad = diff.sub_(kl).mul_(q)
    return grad if temperature == 1.0 else grad.div_(temperature)


def _chunk_sums(
    s: Tensor, t: Tensor, labels: Tensor, valid: Tensor, temperature: float, reverse: bool, vocab_size: int, dtype
) -> tuple[Tensor, Tensor]:
    """One chunk's (sum of KL, sum of CE) over its valid tokens. (c, Vs), (c, Vt), (c,), (c,) -> (), ()."""
    kl = _kl_rows(s[:, :vocab_size], t[:, :vocab_size], temperature, reverse, dtype)
    ce = F.cross_entropy(s.to(dtype), labels, reduction="none")  # over all student columns, as GPT.loss
    # where, not multiply: a padded row may hold anything, and 0 * inf would be NaN.
    return torch.where(valid, kl, 0.0).sum(), torch.where(valid, ce, 0.0).sum()


def _chunk_grad(
    s: Tensor,
    t: Tensor,
    labels: Tensor,
    valid: Tensor,
    w_kl: Tensor,
    w_ce: Tensor,
    temperature: float,
    reverse: bool,
    vocab_size: int,
    dtype: torch.dtype,
) -> Tensor:
    """d (w_kl * KL_sum + w_ce * CE_sum) / d s for one chunk, in the logits' dtype: (c, Vs)."""
    g_kl = _kl_grad(s[:, :vocab_size], t[:, :vocab_size], temperature, reverse, dtype).mul_(w_kl)
    # d CE_row / d logits = softmax(logits) - onehot(label), over all student columns.
    g = torch.softmax(s.to(dtype), dim=-1)
    g.scatter_add_(1, labels[:, None], torch.full_like(g[:, :1], -1.0))
    g.mul_(w_ce)
    g[:, :vocab_size] += g_kl
    # Padded rows get 0 by masking, not by a 0 weight: their logits may hold anything (0 * inf = NaN).
    return g.masked_fill_(~valid[:, None], 0.0).to(s.dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _kernel(fn, logits: Tensor):
    """`fn` compiled on GPUs: Inductor fuses each chunk's softmaxes, KL and CE (or their gradient) into
    a few passes over the logits, with no float32 [chunk, V] block in memory. On an H200, forward +
    backward over 8192 tokens of a 50K vocabulary took 42 ms eagerly and 7.4 ms compiled
    (benchmarks/distill_step.py, "loss only"). Eager on CPUs and in float64 (the reference tests)."""
    if logits.device.type != "cuda" or logits.dtype == torch.float64:
        return fn
    return _compiled(fn)


class _ChunkedDistillation(torch.autograd.Function):
    """(student (N, Vs), teacher (N, Vt), labels (N,)) -> (mean KL, mean CE) over the tokens whose
    label is not ignore_index. Gradients flow to the student logits only."""

    @staticmethod
    def forward(
        ctx,
        student: Tensor,
        teacher: Tensor,
        labels: Tensor,
        temperature: float,
        reverse: bool,
        ignore_index: int,
        vocab_size: int,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        # float64 inputs stay float64 (gradcheck, the reference tests); everything else computes in float32.
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        valid = labels != ignore_index  # (N,)
        n = valid.sum().clamp(min=1).to(dtype)  # no valid token: both terms are 0, not NaN
        safe = torch.where(valid, labels, 0)  # ignore_index may be negative: gather needs a real column
        kl_sum = torch.zeros((), dtype=dtype, device=student.device)
        ce_sum = torch.zeros((), dtype=dtype, device=student.device)
        sums = _kernel(_chunk_sums, student)
        for i in range(0, student.shape[0], chunk_size):
            c = slice(i, i + chunk_size)
            kl, ce = sums(student[c], teacher[c], safe[c], valid[c], temperature, reverse, vocab_size, dtype)
            kl_sum += kl
            ce_sum += ce
        ctx.save_for_backward(student, teacher, safe, valid, n)
        ctx.options = (temperature, reverse, vocab_size, chunk_size, dtype)
        return kl_sum / n, ce_sum / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        student, teacher, safe, valid, n = ctx.saved_tensors
        temperature, reverse, vocab_size, chunk_size, dtype = ctx.options
        grad = torch.empty_like(student)  # (N, Vs), the logits' dtype
        # Each valid token's share of the two means is 1/n.
        w_kl, w_ce = (grad_kl / n).to(dtype), (grad_ce / n).to(dtype)
        grads = _kernel(_chunk_grad, student)
        for i in range(0, student.shape[0], chunk_size):
            c = slice(i, i + chunk_size)
            grad[c] = grads(
                student[c], teacher[c], safe[c], valid[c], w_kl, w_ce, temperature, reverse, vocab_size, dtype
            )
        return grad, None, None, None, None, None, None, None


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.7,
    temperature: float = 1.0,
    kind: str = "forward",
    ignore_index: int = -100,
    vocab_size: int | None = None,
    chunk_size: int | None = 1024,
) -> dict[str, Tensor]:
    """alpha * T^2 * KL + (1 - alpha) * CE, averaged over the tokens whose label is not ignore_index.

    student_logits: (..., Vs), the student's raw logits (any float dtype; bf16 is fine).
    teacher_logits: (..., Vt), a fixed target: no gradient flows into it.
    labels: (...), next-token ids; positions equal to ignore_index (padding) count in neither term.
    vocab_size: the KL compares the first `vocab_size` columns (GPT pads its head to a multiple of
        64; padding ids never occur, so their columns carry no knowledge). None: all columns, and
        then Vs must equal Vt. The CE term uses all student columns, exactly as GPT.loss does, so
        `ce` is the number a student trained without a teacher reports as its loss.
    chunk_size: tokens per chunk (see the module docstring); None: one chunk of every token.

    Returns {"loss", "kl", "ce"}: the total, the mean KL at temperature T (nats per token, before
    the alpha * T^2 weight) and the mean CE (nats per token).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)} and "
            f"labels {tuple(labels.shape)} must agree on every dimension but the last (vocabulary)"
        )
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"student has {vs} logits per token and teacher {vt}: pass vocab_size to compare a prefix")
        vocab_size = vs
    elif not 0 < vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {min(vs, vt)}] (student {vs}, teacher {vt} logits)")

    student = student_logits.reshape(-1, vs)  # (N, Vs): a view when contiguous, as model outputs are
    teacher = teacher_logits.detach().reshape(-1, vt)  # (N, Vt)
    chunk = chunk_size or max(1, student.shape[0])
    kl, ce = _ChunkedDistillation.apply(
        student, teacher, labels.reshape(-1), float(temperature), kind == "reverse", ignore_index, vocab_size, chunk
    )
    return {"loss": alpha * temperature**2 * kl + (1.0 - alpha) * ce, "kl": kl, "ce": ce}
