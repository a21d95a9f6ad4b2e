"""losses/distill.py against a float64 reference written straight from the formula."""

import pytest
import torch
import torch.nn.functional as F

from {{cookiecutter.package}}.losses.distill import distillation_loss

IGNORE = -100


def reference(student, teacher, labels, alpha, temperature, kind, vocab_size):
    """alpha T^2 KL + (1 - alpha) CE in float64, every step spelled out; means over non-ignored tokens."""
    s, t = student.double().flatten(0, -2), teacher.double().flatten(0, -2)  # (N, Vs), (N, Vt)
    y = labels.flatten()
    keep = y != IGNORE
    s, t, y = s[keep], t[keep], y[keep]
    s_t, t_t = s[:, :vocab_size] / temperature, t[:, :vocab_size] / temperature
    log_q = s_t - torch.logsumexp(s_t, dim=-1, keepdim=True)  # student at temperature T
    log_p = t_t - torch.logsumexp(t_t, dim=-1, keepdim=True)  # teacher at temperature T
    kl_forward = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(p || q)
    kl_reverse = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(q || p)
    kl = kl_forward if kind == "forward" else kl_reverse
    log_probs = s - torch.logsumexp(s, dim=-1, keepdim=True)  # CE over every student column
    ce = -log_probs[torch.arange(len(y)), y]
    kl, ce = kl.mean(), ce.mean()
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def random_case(seed=0, B=3, T=11, Vs=70, Vt=67, V=64, dtype=torch.float32):
    """Student and teacher heads wider than the vocabulary (padding columns), some labels ignored."""
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(B, T, Vs, generator=g)).to(dtype)
    teacher = (3 * torch.randn(B, T, Vt, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE
    labels[-1, -1] = IGNORE
    return student, teacher, labels


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [None, 7, 1])
def test_matches_float64_reference_values_and_gradients(kind, temperature, chunk_size):
    student, teacher, labels = random_case()
    student.requires_grad_(True)
    out = distillation_loss(
        student,
        teacher,
        labels,
        alpha=0.7,
        temperature=temperature,
        kind=kind,
        ignore_index=IGNORE,
        vocab_size=64,
        chunk_size=chunk_size,
    )
    out["loss"].backward()

    ref_student = student.detach().double().requires_grad_(True)
    loss, kl, ce = reference(ref_student, teacher, labels, 0.7, temperature, kind, vocab_size=64)
    loss.backward()
    for name, expected in (("loss", loss), ("kl", kl), ("ce", ce)):
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name].double(), expected.detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-4, atol=1e-7)
    assert student.grad[0, :4].abs().max() == 0  # ignored positions get no gradient
    assert student.grad[1, :, 64:].abs().max() > 0  # padding columns still learn from the CE term


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_chunked_and_unchunked_agree(kind):
    student, teacher, labels = random_case(seed=1, B=4, T=33)
    grads, outs = [], []
    for chunk_size in (None, 5, 32):
        s = student.clone().requires_grad_(True)
        out = distillation_loss(s, teacher, labels, temperature=2.0, kind=kind, vocab_size=64, chunk_size=chunk_size)
        out["loss"].backward()
        outs.append(out)
        grads.append(s.grad)
    for out, grad in zip(outs[1:], grads[1:]):
        for name in ("loss", "kl", "ce"):
            torch.testing.assert_close(out[name], outs[0][name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grads[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_hand_written_backward_passes_gradcheck(kind):
    student, teacher, labels = random_case(seed=2, B=2, T=5, Vs=12, Vt=10, V=9, dtype=torch.float64)
    labels = labels.clamp(max=8)
    labels[0, 0] = IGNORE

    def total(s):
        out = distillation_loss(s, teacher, labels, alpha=0.4, temperature=1.7, kind=kind, vocab_size=9, chunk_size=3)
        return out["loss"]

    assert torch.autograd.gradcheck(total, (student.requires_grad_(True),))


def test_bf16_logits_are_computed_in_float32():
    student, teacher, labels = random_case(seed=3, dtype=torch.bfloat16)
    s = student.clone().requires_grad_(True)
    out = distillation_loss(s, teacher, labels, temperature=2.0, vocab_size=64, chunk_size=8)
    out["loss"].backward()
    loss, _, _ = reference(student, teacher, labels, 0.7, 2.0, "forward", vocab_size=64)
    # The inputs are the same bf16 numbers, so only float32 rounding separates the two.
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_alpha_weights_the_two_terms_and_ce_is_the_plain_lm_loss():
    student, teacher, labels = random_case(seed=4)
    lm_loss = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)  # what GPT.loss computes
    only_ce = distillation_loss(student, teacher, labels, alpha=0.0, temperature=3.0, vocab_size=64)
    torch.testing.assert_close(only_ce["loss"], lm_loss)
    torch.testing.assert_close(only_ce["ce"], lm_loss)
    only_kl = distillation_loss(student, teacher, labels, alpha=1.0, temperature=3.0, vocab_size=64)
    torch.testing.assert_close(only_kl["loss"], 9.0 * only_kl["kl"])  # T^2 = 9
    assert only_kl["kl"] > 0


def test_kl_is_zero_when_the_student_matches_the_teacher_and_grows_with_the_gap():
    _, teacher, labels = random_case(seed=5, Vs=67)
    same = distillation_loss(teacher.clone(), teacher, labels, vocab_size=64)
    assert abs(same["kl"].item()) < 1e-6
    far = distillation_loss(-teacher, teacher, labels, vocab_size=64)
    assert far["kl"] > 1.0


def test_padding_positions_are_ignored_entirely():
    student, teacher, labels = random_case(seed=6)
    changed = student.clone()
    changed[0, :4] = float("inf")  # garbage where the labels are padding
    a = distillation_loss(student, teacher, labels, vocab_size=64, chunk_size=4)
    b = distillation_loss(changed, teacher, labels, vocab_size=64, chunk_size=4)
    for name in ("loss", "kl", "ce"):
        torch.testing.assert_close(a[name], b[name])
    changed.requires_grad_(True)
    distillation_loss(changed, teacher, labels, vocab_size=64, chunk_size=4)["loss"].backward()
    assert torch.isfinite(changed.grad).all() and changed.grad[0, :4].abs().max() == 0
    s = student.clone().requires_grad_(True)
    out = distillation_loss(s, teacher, torch.full_like(labels, IGNORE), vocab_size=64)
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and s.grad.abs().max() == 0  # nothing to learn, and no NaN


def test_no_gradient_reaches_the_teacher_logits():
    student, teacher, labels = random_case(seed=7)
    s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    distillation_loss(s, t, labels, vocab_size=64)["loss"].backward()
    assert s.grad is not None and t.grad is None


def test_nothing_vocabulary_sized_is_kept_for_backward_but_the_inputs():
    """Autograd through a plain chunk loop would keep float32 softmaxes of every chunk until backward."""
    student, teacher, labels = random_case(seed=8, B=4, T=64)
    s = student.clone().requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = distillation_loss(s, teacher, labels, vocab_size=64, chunk_size=16)
    inputs = {s.data_ptr(), teacher.data_ptr()}
    extra = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs and t.numel() >= 16 * 64]
    assert not extra, f"blocks kept for backward besides the logits: {extra}"
    out["loss"].backward()  # and backward still works from just those


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=1.5), r"alpha must be in \[0, 1\], got 1.5"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(kind="symmetric"), "kind must be one of"),
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
        (dict(vocab_size=None), "student has 70 logits per token and teacher 67"),
        (dict(vocab_size=68), r"vocab_size=68 must be in \[1, 67\]"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    student, teacher, labels = random_case()
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, labels, **{"vocab_size": 64, **kwargs})


def test_shape_mismatch_is_one_clear_error():
    student, teacher, labels = random_case()
    with pytest.raises(ValueError, match="must agree on every dimension but the last"):
        distillation_loss(student, teacher[:, :-1], labels, vocab_size=64)


@pytest.mark.gpu
def test_working_memory_is_bounded_by_the_chunk_at_gpt2_vocabulary_size():
    """The module docstring's claim, measured: beyond the logits and their gradient, at most three
    float32 [chunk, vocab] blocks. An unchunked float32 computation would need several N x V ones."""
    n, vocab, padded, chunk = 8192, 50257, 50304, 1024
    device = torch.device("cuda")
    student = torch.randn(n, padded, device=device, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(n, padded, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    distillation_loss(student, teacher, labels, vocab_size=vocab, chunk_size=chunk)["loss"].backward()
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    gradient = student.numel() * student.element_size()  # what backward returns for any loss
    block = chunk * padded * 4
    assert extra <= gradient + 3 * block + 64 * 2**20, (extra / 2**20, gradient / 2**20, block / 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_compiled_chunk_kernels_equal_the_eager_ones(kind):
    """On GPUs the per-chunk forward and gradient run through torch.compile (losses/distill.py `_kernel`).
    The same compilation on the CPU must give the eager numbers, padded rows included."""
    from {{cookiecutter.package}}.losses.distill import _chunk_grad, _chunk_sums

    torch._dynamo.reset()
    student, teacher, labels = random_case(seed=11, B=2, T=16)
    s, t, y = student.flatten(0, 1), teacher.flatten(0, 1), labels.flatten()
    valid = y != IGNORE
    safe = torch.where(valid, y, 0)
    s[~valid] = float("inf")  # a padded row holding anything must not leak into the sums or gradient
    args = (2.0, kind == "reverse", 64, torch.float32)
    w_kl, w_ce = torch.tensor(0.3), torch.tensor(0.05)
    eager_sums = _chunk_sums(s, t, safe, valid, *args)
    compiled_sums = torch.compile(_chunk_sums, dynamic=False)(s, t, safe, valid, *args)
    torch.testing.assert_close(compiled_sums, eager_sums, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(x) for x in eager_sums)
    eager_grad = _chunk_grad(s, t, safe, valid, w_kl, w_ce, *args)
    compiled_grad = torch.compile(_chunk_grad, dynamic=False)(s, t, safe, valid, w_kl, w_ce, *args)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)
    assert compiled_grad[~valid].eq(0).all() and compiled_grad[valid].abs().sum() > 0
