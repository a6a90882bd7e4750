import math

import pytest
import torch
import torch.nn.functional as F

from lafs.losses import ArcFace, CosFace, DINOLoss, ProSLoss, StepWeight, create_margin_head, landmark_regulariser


def test_dino_loss_matches_hand_computed_case():
    # 2 teacher globals, 3 student views, batch 1, 2 logits.
    loss_fn = DINOLoss(out_dim=2, num_views=3, num_teacher_views=2, student_temp=1.0, center_momentum=0.5)
    loss_fn.center.fill_(0.0)
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])  # views 0,1,2
    teacher = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]])
    # teacher temp 1: t0 = (1/2, 1/2), t1 = (4/5, 1/5); student s0=(1/2,1/2), s1=(3/4,1/4), s2=(1/4,3/4)
    t = [(0.5, 0.5), (0.8, 0.2)]
    s = [(0.5, 0.5), (0.75, 0.25), (0.25, 0.75)]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(-(t[i][0] * math.log(s[v][0]) + t[i][1] * math.log(s[v][1])) for i, v in pairs) / 4
    loss = loss_fn(student, teacher, teacher_temp=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # centre: 0.5 * 0 + 0.5 * mean(teacher rows)
    torch.testing.assert_close(loss_fn.center, 0.5 * teacher.mean(0, keepdim=True))


def test_dino_loss_temperatures_and_centering():
    loss_fn = DINOLoss(out_dim=5, num_views=4, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, 5))
    student, teacher = torch.randn(4 * 3, 5), torch.randn(2 * 3, 5)
    center = loss_fn.center.clone()
    t = F.softmax((teacher - center) / 0.04, -1).reshape(2, 3, 5)
    s = F.log_softmax(student / 0.1, -1).reshape(4, 3, 5)
    terms = [-(t[i] * s[v]).sum(-1).mean() for i in range(2) for v in range(4) if v != i]
    assert loss_fn(student, teacher, 0.04).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_gradient_flows_to_student_not_teacher():
    loss_fn = DINOLoss(out_dim=6, num_views=3)
    student = torch.randn(6, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    loss_fn(student, teacher, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_pros_loss_adds_mean_entropy_term():
    torch.manual_seed(0)
    student, teacher = torch.randn(3 * 4, 8), torch.randn(2 * 4, 8)
    plain = ProSLoss(8, 3, me_max_weight=0.0)(student, teacher, 0.05)
    pros = ProSLoss(8, 3, me_max_weight=1.0)
    mean_p = F.softmax(student / 0.1, -1).mean(0)
    expected = plain + (mean_p * (mean_p * 8).log()).sum()  # KL(mean || uniform over 8)
    assert pros(student, teacher, 0.05).item() == pytest.approx(expected.item(), rel=1e-5)


def test_arcface_without_margin_is_scaled_cosine():
    head = ArcFace(16, 10, s=30.0, m=0.0)
    emb = torch.randn(5, 16)
    labels = torch.randint(0, 10, (5,))
    cos = F.linear(F.normalize(emb), F.normalize(head.weight))
    torch.testing.assert_close(head(emb, labels), 30.0 * cos)


def test_arcface_margin_on_target_angle():
    head = ArcFace(16, 10, s=1.0, m=0.5)
    emb = torch.randn(5, 16)
    labels = torch.randint(0, 10, (5,))
    cos = head.cosine(emb)
    out = head(emb, labels)
    theta = torch.acos(cos.gather(1, labels[:, None]))
    expected = torch.where(
        theta + 0.5 < math.pi, torch.cos(theta + 0.5), cos.gather(1, labels[:, None]) - 0.5 * math.sin(math.pi - 0.5)
    )
    torch.testing.assert_close(out.gather(1, labels[:, None]), expected, atol=1e-5, rtol=1e-5)


def test_cosface_margin_on_target_logit_only():
    head = CosFace(16, 10, s=64.0, m=0.4)
    emb = torch.randn(5, 16)
    labels = torch.tensor([0, 3, 3, 9, 1])
    cos = head.cosine(emb)
    diff = head(emb, labels) - 64.0 * cos
    expected = torch.zeros_like(diff)
    expected[torch.arange(5), labels] = -64.0 * 0.4
    torch.testing.assert_close(diff, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="arcface"):
        create_margin_head("sphereface", 16, 10, 64, 0.4)


def test_landmark_regulariser_and_official_schedule():
    pred = torch.full((2, 3, 2), 111.0, requires_grad=True)
    frozen = torch.zeros(2, 3, 2)
    assert landmark_regulariser(pred, frozen).item() == pytest.approx(1.0)
    landmark_regulariser(pred, frozen).backward()
    assert pred.grad is not None
    w = StepWeight()
    assert [w(e) for e in (0, 7, 8, 13, 14, 20, 21, 27, 28, 40)] == [1000, 1000, 100, 100, 1, 1, 0.11, 0.11, 0, 0]
    with pytest.raises(ValueError, match="epoch 0"):
        StepWeight([(2, 1.0)])
