"""DINO loss vs an explicit numpy double loop; centre EMA and teacher-temperature schedule."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_skipless.dino import DINOLoss, dino_loss
from dino_skipless.dino.loss import teacher_entropies


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_loss(s, t, center, t_temp, s_temp, n_crops, n_global):
    """Upstream's loop, in float64 numpy: returns (loss, number of pairs)."""
    b = s.shape[0] // n_crops
    s_views = [s[v * b : (v + 1) * b] / s_temp for v in range(n_crops)]
    t_views = [_softmax((t[i * b : (i + 1) * b] - center) / t_temp) for i in range(n_global)]
    total, pairs = 0.0, 0
    for iq, q in enumerate(t_views):
        for v, sv in enumerate(s_views):
            if v == iq:
                continue
            logp = np.log(_softmax(sv))
            per_sample = [-sum(q[n, k] * logp[n, k] for k in range(q.shape[1])) for n in range(b)]
            total += sum(per_sample) / b
            pairs += 1
    return total / pairs, pairs


@pytest.mark.parametrize("n_crops,n_global", [(10, 2), (4, 2), (3, 1)])
def test_dino_loss_matches_double_loop(n_crops, n_global):
    rng = np.random.default_rng(0)
    b, k = 3, 7
    s = rng.normal(size=(n_crops * b, k)) * 2
    t = rng.normal(size=(n_global * b, k)) * 2
    center = rng.normal(size=(1, k))
    ref, pairs = reference_loss(s, t, center, 0.05, 0.1, n_crops, n_global)
    assert pairs == n_global * n_crops - n_global
    got = dino_loss(
        torch.tensor(s, dtype=torch.float32),
        torch.tensor(t, dtype=torch.float32),
        torch.tensor(center, dtype=torch.float32),
        teacher_temp=0.05,
        student_temp=0.1,
        n_crops=n_crops,
        n_global=n_global,
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_pair_count_is_18_and_same_view_pairs_skipped():
    # One-hot teacher targets and a student that puts all mass on a different class in view v
    # make each pair's loss a known constant; only the 18 cross-view pairs may contribute.
    b, k, n_crops = 2, 5, 10
    s = torch.zeros(n_crops * b, k)
    # student view v, sample n: logit 0 everywhere, so log p = -log k for every class
    t = torch.full((2 * b, k), -1e4)
    t[:, 0] = 0.0  # teacher q = one-hot(0)
    # Make student view 0 and 1 (the teacher's own views) wildly wrong on class 0: if the
    # same-view pairs (0,0) and (1,1) were counted the loss would blow up.
    s[0 : 2 * b, 0] = -1e3
    loss = dino_loss(s, t, torch.zeros(1, k), teacher_temp=0.04, n_crops=n_crops)
    # Pairs: teacher 0 with student 1 (huge) + 8 locals (log k); teacher 1 with student 0 (huge)
    # + 8 locals. Each huge term is -log p_0 with logit -1e4 (= -1e3/0.1) vs 0 elsewhere.
    huge = -torch.log_softmax(torch.tensor([-1e4, 0, 0, 0, 0]), 0)[0].item()
    expected = (2 * huge + 16 * np.log(k)) / 18
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_center_shifts_teacher_targets():
    rng = np.random.default_rng(1)
    s = torch.tensor(rng.normal(size=(4 * 2, 6)), dtype=torch.float32)
    t = torch.tensor(rng.normal(size=(2 * 2, 6)), dtype=torch.float32)
    c = torch.tensor(rng.normal(size=(1, 6)), dtype=torch.float32)
    with_c = dino_loss(s, t, c, 0.04, n_crops=4)
    # Subtracting the centre from the teacher logits by hand gives the same value ...
    assert with_c.item() == pytest.approx(
        dino_loss(s, t - c, torch.zeros(1, 6), 0.04, n_crops=4).item(), rel=1e-6
    )
    # ... and differs from the uncentred loss.
    assert abs(with_c.item() - dino_loss(s, t, torch.zeros(1, 6), 0.04, n_crops=4).item()) > 1e-3


def test_gradient_flows_to_student_only():
    s = torch.randn(6 * 2, 5, requires_grad=True)
    t = torch.randn(2 * 2, 5, requires_grad=True)
    dino_loss(s, t, torch.zeros(1, 5), 0.04, n_crops=6).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of n_crops"):
        dino_loss(torch.zeros(7, 4), torch.zeros(2, 4), torch.zeros(1, 4), 0.04, n_crops=10)
    with pytest.raises(ValueError, match="n_global"):
        dino_loss(torch.zeros(20, 4), torch.zeros(2, 4), torch.zeros(1, 4), 0.04, n_crops=10)


def test_teacher_temp_schedule_matches_linspace():
    crit = DINOLoss(out_dim=4, n_crops=10)  # 0.04 -> 0.07 over 30 of 300 epochs
    warm = np.linspace(0.04, 0.07, 30)
    for epoch, expected in [(0, 0.04), (15, warm[15]), (29, 0.07), (30, 0.07), (100, 0.07)]:
        assert crit.teacher_temp_at(epoch) == pytest.approx(expected, abs=1e-12)
    assert crit.teacher_temp_at(15) == pytest.approx(0.04 + 15 * 0.03 / 29, abs=1e-12)
    assert len(crit.teacher_temp_schedule) == 300
    assert crit.teacher_temp_at(1000) == pytest.approx(0.07)  # past the end: last value


def test_teacher_temp_schedule_short_run_truncates():
    crit = DINOLoss(out_dim=4, n_crops=4, warmup_teacher_temp_epochs=30, n_epochs=5)
    np.testing.assert_allclose(crit.teacher_temp_schedule, np.linspace(0.04, 0.07, 30)[:5])


def test_forward_uses_old_center_then_updates_it():
    torch.manual_seed(0)
    k, b, m = 6, 3, 0.9
    crit = DINOLoss(
        out_dim=k, n_crops=4, center_momentum=m, n_epochs=10, warmup_teacher_temp_epochs=5
    )
    c0 = torch.randn(1, k)
    crit.center.copy_(c0)
    s, t = torch.randn(4 * b, k), torch.randn(2 * b, k)
    loss = crit(s.to(torch.bfloat16), t.to(torch.bfloat16), epoch=2)
    assert loss.dtype == torch.float32
    expected = dino_loss(
        s.bfloat16().float(), t.bfloat16().float(), c0, crit.teacher_temp_at(2), n_crops=4
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Hand formula: m * c + (1 - m) * mean over teacher rows.
    t_rows = t.bfloat16().double().numpy()
    want = m * c0.double().numpy() + (1 - m) * t_rows.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(crit.center.double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert "center" in crit.state_dict()


def test_teacher_entropies_hand_cases():

    k = 16
    zero = torch.zeros(1, k)
    # identical rows (after centring): every target flat -> both entropies are ln K
    per_row, of_mean = teacher_entropies(torch.ones(4, k), torch.ones(1, k), 0.04)
    assert per_row == pytest.approx(np.log(k), abs=1e-6)
    assert of_mean == pytest.approx(np.log(k), abs=1e-6)
    # four images, each a sharp one-hot on its own dimension: per-row 0, batch-mean ln 4
    logits = torch.full((4, k), -1.0)
    logits[torch.arange(4), torch.arange(4)] = 1.0
    per_row, of_mean = teacher_entropies(logits, zero, 0.01)
    assert per_row == pytest.approx(0.0, abs=1e-6)
    assert of_mean == pytest.approx(np.log(4), abs=1e-6)
    # a general case against numpy
    rng = np.random.default_rng(0)
    t, c = rng.normal(size=(6, k)), rng.normal(size=(1, k))
    z = (t - c) / 0.07
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    want_row = float(np.mean(-(q * np.log(q)).sum(1)))
    m = q.mean(0)
    want_mean = float(-(m * np.log(m)).sum())
    per_row, of_mean = teacher_entropies(torch.tensor(t), torch.tensor(c), 0.07)
    assert per_row == pytest.approx(want_row, rel=1e-5)
    assert of_mean == pytest.approx(want_mean, rel=1e-5)


def _dinov2_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2's ``SinkhornKnoppTeacher.sinkhorn_knopp_teacher`` (single process), verbatim
    apart from float64: the reference for ours."""
    q = torch.exp(teacher_output.double() / teacher_temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def test_sinkhorn_knopp_matches_dinov2_and_balances_the_batch():
    from dino_skipless.dino.loss import sinkhorn_knopp_targets

    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 32, generator=g) * 0.05  # small logits: upstream's exp does not overflow
    ours = sinkhorn_knopp_targets(t, 0.04, 3)
    ref = _dinov2_sinkhorn_knopp(t, 0.04, 3)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    # every image's target is a distribution; with more rounds every prototype gets 1/K of
    # the batch: here B/K = 2 images' worth of mass each
    torch.testing.assert_close(ours.sum(1), torch.ones(64), rtol=1e-5, atol=1e-6)
    many = sinkhorn_knopp_targets(t, 0.04, 200)
    torch.testing.assert_close(many.sum(0), torch.full((32,), 2.0), rtol=1e-3, atol=1e-3)
    # logits that would overflow float32's exp upstream (x / T = 2,500) stay finite here
    big = sinkhorn_knopp_targets(t * 2000, 0.04, 3)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big.sum(1), torch.ones(64), rtol=1e-5, atol=1e-6)


def test_loss_with_sinkhorn_knopp_uses_its_targets_and_keeps_no_centre():
    from dino_skipless.dino.loss import cross_entropy_over_views, sinkhorn_knopp_targets

    g = torch.Generator().manual_seed(1)
    n_crops, b, k = 4, 8, 16
    s, t = torch.randn(n_crops * b, k, generator=g), torch.randn(2 * b, k, generator=g)
    fn = DINOLoss(k, n_crops, 0.04, 0.04, 0, 5, centering="sinkhorn_knopp")
    loss = fn(s, t, epoch=0)
    q = sinkhorn_knopp_targets(t, 0.04, 3)  # over both global views at once, as DINOv2
    assert loss.item() == pytest.approx(cross_entropy_over_views(s, q, 0.1, n_crops).item())
    assert torch.equal(fn.center, torch.zeros(1, k))  # DINOv2 keeps no centre with SK
    h, hb = fn.last_entropies  # the collapse monitor reads the targets actually used
    assert hb - h > 0
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(k, n_crops, centering="median")


def test_koleo_matches_dinov2_and_rewards_spread():
    from dino_skipless.dino.loss import koleo_loss

    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 8, generator=g)
    # DINOv2's KoLeoLoss, verbatim apart from the module wrapper
    y = F.normalize(x, eps=1e-8, p=2, dim=-1)
    dots = torch.mm(y, y.t())
    dots.view(-1)[:: (len(y) + 1)].fill_(-1)
    _, nn_idx = torch.max(dots, dim=1)
    ref = -torch.log(torch.nn.PairwiseDistance(2, eps=1e-8)(y, y[nn_idx]) + 1e-8).mean()
    assert koleo_loss(x).item() == pytest.approx(ref.item(), rel=1e-6)
    # images pressed together cost more than images spread out
    tight = torch.ones(12, 8) + 1e-3 * torch.randn(12, 8, generator=g)
    assert koleo_loss(tight) > koleo_loss(x)
