"""EMA teacher update against the hand formula m * t + (1 - m) * s."""

import copy

import pytest
import torch
from conftest import tiny_vit

from dino_skipless.dino import DINOHead, MultiCropWrapper, ema_update_
from dino_skipless.dino.ema import _unwrap


def _pair():
    backbone = tiny_vit("skipless_init", embed_dim=32, num_heads=2)
    student = MultiCropWrapper(
        backbone, DINOHead(backbone.embed_dim, out_dim=10, hidden_dim=16, bottleneck_dim=8)
    )
    teacher = copy.deepcopy(student)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    return teacher, student


@pytest.mark.parametrize("m", [0.996, 0.5, 0.0, 1.0])
def test_ema_matches_formula(m):
    teacher, student = _pair()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, m)
    s = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        expected = m * before[n].double() + (1 - m) * s[n].detach().double()
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)
        if m == 1.0:
            assert torch.equal(p, before[n])
        if m == 0.0:
            assert torch.equal(p, s[n])


def test_ema_includes_frozen_params_and_leaves_student_alone():
    teacher, student = _pair()
    student_before = copy.deepcopy(student.state_dict())
    student.head.last_layer.weight_g.requires_grad_(False)  # frozen params are averaged too
    g_t = teacher.head.last_layer.weight_g.detach().clone()
    ema_update_(teacher, student, 0.9)
    torch.testing.assert_close(
        teacher.head.last_layer.weight_g, 0.9 * g_t + 0.1 * student.head.last_layer.weight_g
    )
    for k, v in student.state_dict().items():
        assert torch.equal(v, student_before[k])


def test_ema_unwraps_wrapped_student():
    teacher, student = _pair()
    wrapped = torch.nn.DataParallel(student)  # same `.module` convention as DDP
    assert _unwrap(wrapped) is student
    ref = copy.deepcopy(teacher)
    ema_update_(teacher, wrapped, 0.7)
    ema_update_(ref, student, 0.7)
    for a, b in zip(teacher.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_ema_mismatch_and_bad_momentum_raise():
    teacher, student = _pair()
    other = DINOHead(8, out_dim=4, hidden_dim=8, bottleneck_dim=4)
    with pytest.raises(ValueError, match="parameters"):
        ema_update_(teacher, other, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(teacher, student, 1.5)
