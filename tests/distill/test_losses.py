"""Each training objective against a direct formula."""

import math

import torch
import torch.nn.functional as F

from distill.losses import (
    certainty_forcing_loss,
    forward_kl,
    log_prob_mse,
    loss_start,
    mask_block_after_prefix,
    mask_tokens,
    masked_diffusion_loss,
    next_token_loss,
    per_position,
    reverse_kl,
    token_cross_entropy,
    total_variation,
)


def test_next_token_loss_is_mean_ce_over_mask():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    expected, count = 0.0, 0
    for b in range(2):
        for i in range(5):
            if mask[b, i]:
                expected += -torch.log_softmax(logits[b, i], -1)[targets[b, i]].item()
                count += 1
    assert math.isclose(next_token_loss(logits, targets, mask).item(), expected / count, rel_tol=1e-6)


def test_masked_diffusion_loss_weights_by_inverse_t_and_response_length():
    torch.manual_seed(1)
    logits, targets = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    masked = torch.tensor([[0, 0, 1, 0, 1, 1], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    t = torch.tensor([0.5, 0.25])
    per_sample = []
    for b in range(2):
        total = sum(-torch.log_softmax(logits[b, i], -1)[targets[b, i]].item() for i in range(6) if masked[b, i])
        per_sample.append(total / t[b].item() / response[b].sum().item())
    got = masked_diffusion_loss(logits, targets, masked, t, response).item()
    assert math.isclose(got, sum(per_sample) / 2, rel_tol=1e-6)


def test_mask_tokens_masks_only_response_at_rate_t():
    ids = torch.arange(4000).remainder(50).view(2, 2000) + 10
    response = torch.zeros(2, 2000, dtype=torch.long)
    response[:, 100:] = 1
    noisy, masked, t = mask_tokens(ids, response, 0, 0.1, torch.Generator().manual_seed(0))
    assert not masked[:, :100].any()
    assert torch.equal(noisy[masked], torch.zeros(int(masked.sum()), dtype=torch.long))
    assert torch.equal(noisy[~masked], ids[~masked])
    assert ((t >= 0.1) & (t <= 1)).all()
    rates = masked[:, 100:].float().mean(-1)
    assert torch.allclose(rates, t, atol=0.05)
    again = mask_tokens(ids, response, 0, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], noisy)


def test_mask_block_after_prefix_keeps_a_clean_prefix_a_noised_block_and_a_masked_future():
    ids = torch.arange(3 * 40).remainder(50).view(3, 40) + 10
    response = torch.zeros(3, 40, dtype=torch.long)
    response[0, 5:] = 1
    response[1, 12:30] = 1  # right-padded after its answer
    response[2, 39:] = 1  # a one-token answer
    seen_cuts = set()
    for seed in range(20):
        noisy, masked, scored, t = mask_block_after_prefix(
            ids, response, 0, 0.01, 4, torch.Generator().manual_seed(seed)
        )
        assert torch.equal(noisy[masked], torch.zeros(int(masked.sum()), dtype=torch.long))
        assert torch.equal(noisy[~masked], ids[~masked])
        assert not (masked & ~response.bool()).any() and not (scored & ~masked).any()
        assert ((t >= 0.01) & (t <= 1)).all()
        for row in range(3):
            positions = response[row].nonzero().flatten()
            cut = int(positions[masked[row, positions]].min()) - int(positions[0])  # the first masked answer token
            seen_cuts.add((row, cut))
            rank = torch.arange(len(positions))
            row_masked, row_scored = masked[row, positions], scored[row, positions]
            assert row_scored[cut]  # the block's first token is always a target
            assert not row_masked[rank < cut].any()  # clean prefix
            assert not row_scored[rank >= cut + 4].any() and row_masked[rank >= cut + 4].all()  # masked future
            assert torch.equal(
                row_scored[(rank >= cut) & (rank < cut + 4)], row_masked[(rank >= cut) & (rank < cut + 4)]
            )
    assert len({cut for row, cut in seen_cuts if row == 0}) > 5 and (2, 0) in seen_cuts
    again = mask_block_after_prefix(ids, response, 0, 0.01, 4, torch.Generator().manual_seed(19))
    assert all(torch.equal(a, b) for a, b in zip(again, (noisy, masked, scored, t), strict=True))


def test_uniform_weighting_is_mean_ce_over_masked_tokens():
    torch.manual_seed(2)
    logits, targets = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    masked = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    response = torch.ones(2, 4, dtype=torch.long)
    ce = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    expected = ((ce[0, 0] + ce[0, 1]) / 2 + ce[1, 3]) / 2
    got = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.3, 0.9]), response, "uniform")
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# SDTT divergences, each against its formula written out over the vocabulary


def _divergence_inputs():
    torch.manual_seed(3)
    student_logits = torch.randn(2, 3, 6)
    teacher_log_probs = torch.log_softmax(torch.randn(2, 3, 6) * 2, -1)
    return student_logits, teacher_log_probs


def _by_formula(student_logits, teacher_log_probs, formula):
    out = torch.zeros(student_logits.shape[:-1])
    for b in range(student_logits.shape[0]):
        for i in range(student_logits.shape[1]):
            q = [math.exp(v) for v in torch.log_softmax(student_logits[b, i].double(), -1).tolist()]
            p = [math.exp(v) for v in teacher_log_probs[b, i].double().tolist()]
            out[b, i] = formula(list(zip(q, p, strict=True)))  # (student, teacher) probability pairs
    return out


def test_reverse_kl_is_kl_of_student_from_teacher():
    student, teacher = _divergence_inputs()
    expected = _by_formula(student, teacher, lambda pairs: sum(q * math.log(q / p) for q, p in pairs))
    assert torch.allclose(reverse_kl(student, teacher), expected, atol=1e-5)
    assert torch.allclose(reverse_kl(teacher, teacher), torch.zeros(2, 3), atol=1e-6)


def test_forward_kl_is_kl_of_teacher_from_student_and_skips_zero_teacher_mass():
    student, teacher = _divergence_inputs()
    expected = _by_formula(student, teacher, lambda pairs: sum(p * math.log(p / q) for q, p in pairs))
    assert torch.allclose(forward_kl(student, teacher), expected, atol=1e-5)
    one_hot = torch.full((1, 4), -torch.inf)
    one_hot[0, 2] = 0.0
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert math.isclose(forward_kl(logits, one_hot).item(), -torch.log_softmax(logits, -1)[0, 2].item(), rel_tol=1e-6)


def test_log_prob_mse_is_mean_squared_log_prob_error():
    student, teacher = _divergence_inputs()
    expected = _by_formula(student, teacher, lambda pairs: sum(math.log(q / p) ** 2 for q, p in pairs) / len(pairs))
    assert torch.allclose(log_prob_mse(student, teacher), expected, atol=1e-5)


def test_total_variation_is_half_l1_of_probabilities():
    student, teacher = _divergence_inputs()
    expected = _by_formula(student, teacher, lambda pairs: 0.5 * sum(abs(q - p) for q, p in pairs))
    assert torch.allclose(total_variation(student, teacher), expected, atol=1e-6)
    assert ((total_variation(student, teacher) >= 0) & (total_variation(student, teacher) <= 1)).all()


# ----------------------------------------------------------------------------------------------------------------
# Scoring the response columns only, in chunks of positions


def test_loss_start_is_the_first_column_holding_a_loss_position():
    left_padded = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]])  # d3LLM: the canvas ends every row
    right_padded = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])  # SequencePool: the shortest prompt decides
    assert loss_start(left_padded) == 3 and loss_start(right_padded) == 1
    assert loss_start(torch.zeros(2, 5, dtype=torch.bool)) == 0


def _entropy_at(logits, targets, masked, temperature):
    """Certainty forcing written out on the whole tensor."""
    log_probs = torch.log_softmax(logits / temperature, -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    correct = masked & (logits.argmax(-1) == targets)
    return (entropy * correct).sum() / correct.sum()


def test_chunked_terms_equal_the_whole_tensor_formula_in_value_and_gradient():
    torch.manual_seed(4)
    shape = (3, 13, 11)  # 13 positions: chunks of 2, the last one shorter
    targets = torch.randint(0, 11, shape[:2])
    teacher = torch.log_softmax(torch.randn(shape), -1)
    masked = torch.rand(shape[:2]) < 0.7
    base = torch.randn(shape)
    base[..., 0] += 3 * masked  # some masked positions predicted right, for certainty forcing
    targets[masked] = 0
    terms = {
        "cross_entropy": (
            lambda x: token_cross_entropy(x, targets),
            lambda x: F.cross_entropy(x.transpose(1, 2), targets, reduction="none"),
        ),
        "certainty_forcing": (
            lambda x: certainty_forcing_loss(x, targets, masked, 0.5),
            lambda x: _entropy_at(x, targets, masked, 0.5),
        ),
        "reverse_kl": (lambda x: per_position(reverse_kl, x, teacher), lambda x: reverse_kl(x, teacher)),
    }
    weights = torch.rand(shape[:2])
    for name, (chunked, whole) in terms.items():
        values, grads = [], []
        for fn in (chunked, whole):
            logits = base.clone().requires_grad_()
            value = fn(logits)
            (value * weights if value.dim() else value).sum().backward()
            values.append(value.detach())
            grads.append(logits.grad)
        assert torch.allclose(values[0], values[1], atol=1e-6), name
        assert torch.allclose(grads[0], grads[1], atol=1e-6), name


def test_cross_entropy_of_bf16_logits_is_computed_in_float32():
    torch.manual_seed(5)
    logits, targets = torch.randn(2, 9, 50).bfloat16(), torch.randint(0, 50, (2, 9))
    expected = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    assert token_cross_entropy(logits, targets).dtype == torch.float32
    assert torch.equal(token_cross_entropy(logits, targets), expected)
