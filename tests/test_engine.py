import copy
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lafs.config import SSLParams
from lafs.engine.checkpoint import (
    ChangedCheckpointError,
    CheckpointError,
    load_checkpoint,
    resume_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lafs.engine.clipping import cancel_last_layer_gradients, clip_gradients
from lafs.engine.distributed import resolve_device
from lafs.engine.ema import ema_update
from lafs.engine.optim import param_groups, set_lr_wd
from lafs.engine.schedules import cosine_schedule, teacher_temp_schedule
from lafs.engine.ssl import NonFiniteLossError, SSLTrainer, build_ssl_task
from lafs.models import create_model
from lafs.stages import StageError

TINY = {
    "num_landmarks": 68,
    "out_dim": 64,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
    "num_prototypes": 32,
    "local_crops": 2,
    "local_landmarks": 12,
    "epochs": 2,
    "batch_size": 2,
    "warmup_epochs": 1,
    "warmup_teacher_temp_epochs": 1,
    "dtype": "fp32",
}


def _cfg(method: str = "lafs", **kw) -> SSLParams:
    model = "dino_vit_tiny" if method == "dino_face" else "lafs_vit_tiny"
    return SSLParams(method=method, model=model, landmark_net="landmark_net_mnv3_small", **{**TINY, **kw})


def _batch(method: str, b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if method == "dino_face":
        return {
            "global": torch.rand(b, 2, 3, 112, 112, generator=g) * 2 - 1,
            "local": torch.rand(b, 2, 3, 48, 48, generator=g) * 2 - 1,
        }
    return {
        "clean": torch.rand(b, 4, 3, 112, 112, generator=g) * 2 - 1,
        "augmented": torch.rand(b, 4, 3, 112, 112, generator=g) * 2 - 1,
    }


def _landmark_net() -> nn.Module:
    net = create_model("landmark_net_mnv3_small", num_landmarks=68)
    net.init_mean_shape(torch.rand(68, 2) * 80 + 16)
    return net


def test_cosine_schedule_warmup_and_ends():
    s = cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=5, warmup_epochs=1)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], np.linspace(0, 1, 5, endpoint=False))
    assert s[5] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1, abs=0.02)
    assert np.all(np.diff(s[5:]) <= 1e-12)
    t = teacher_temp_schedule(0.07, 0.04, warmup_epochs=30, epochs=41)
    assert t[0] == pytest.approx(0.07) and t[29] == pytest.approx(0.04) and np.all(t[30:] == 0.04)


def test_ema_update_formula():
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    before = copy.deepcopy(teacher)
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_per_parameter_clipping_and_frozen_last_layer():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    model = nn.ParameterList([a, b])
    a.grad, b.grad = torch.full((4,), 3.0), torch.full((4,), 0.1)  # norms 6 and 0.2
    norms = clip_gradients(model, clip=3.0)
    torch.testing.assert_close(norms, torch.tensor([6.0, 0.2]))
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-4)  # clipped alone
    torch.testing.assert_close(b.grad, torch.full((4,), 0.1))  # untouched
    head = create_model("lafs_vit_tiny", num_landmarks=4)  # any module
    head.last_layer = nn.Linear(2, 2)
    for p in head.last_layer.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(head, epoch=1, freeze_last_layer=1)
    assert head.last_layer.weight.grad is not None
    cancel_last_layer_gradients(head, epoch=0, freeze_last_layer=1)
    assert head.last_layer.weight.grad is None


def test_param_groups_apply_layer_decay():
    vit = create_model("lafs_vit_tiny", num_landmarks=4)
    depth = len(vit.blocks)
    groups = param_groups(vit, layer_decay=0.5, layer_id=vit.layer_id, num_layers=depth + 1)
    opt = torch.optim.AdamW(groups)
    set_lr_wd(opt, lr=1.0, wd=0.1)
    by_name = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_name[id(vit.blocks[0].mlp.fc1.weight)]["lr"] == pytest.approx(0.5**depth)
    assert by_name[id(vit.norm.weight)]["lr"] == pytest.approx(1.0)
    assert by_name[id(vit.norm.weight)]["weight_decay"] == 0.0
    assert by_name[id(vit.pos_embed)]["weight_decay"] == 0.0
    assert by_name[id(vit.blocks[0].mlp.fc1.weight)]["weight_decay"] == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["lafs", "dino_face", "pros"])
def test_ssl_step_updates_student_only_and_teacher_by_ema(method):
    torch.manual_seed(0)
    net = _landmark_net() if method != "dino_face" else None
    task = build_ssl_task(_cfg(method), net)
    trainer = SSLTrainer(task, iters_per_epoch=2)
    net_before = copy.deepcopy(net.state_dict()) if net else None
    # gradients: one forward/backward by hand
    loss, stats = task(_batch(method), teacher_temp=0.05)
    loss.backward()
    grads = [p.grad for p in task.student.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in task.teacher.parameters())
    if net is not None:
        assert all(p.grad is None for p in net.parameters())
    assert stats["teacher_entropy"] > 0
    task.zero_grad(set_to_none=True)
    student_before = copy.deepcopy(task.student.state_dict())
    teacher_before = copy.deepcopy(task.teacher.state_dict())
    for it in (2, 3):  # epoch 1: last layer no longer frozen, lr > 0
        metrics = trainer.train_step(_batch(method, seed=it), it)
        assert math.isfinite(metrics["loss"])
    changed = [k for k, v in task.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert changed
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(task.teacher.state_dict()[key], teacher_before[key])
    if net is not None:
        assert all(torch.equal(v, net_before[k]) for k, v in net.state_dict().items())


def test_ssl_step_bf16_autocast_runs():
    task = build_ssl_task(_cfg("lafs", dtype="bf16", local_crops=0), _landmark_net())
    trainer = SSLTrainer(task, iters_per_epoch=1)
    assert trainer.autocast_dtype == torch.bfloat16
    batch = {k: v[:1, :2] for k, v in _batch("lafs").items()}
    assert math.isfinite(trainer.train_step(batch, 0)["loss"])


def test_nan_loss_stops_the_step():
    task = build_ssl_task(_cfg("lafs"), _landmark_net())
    trainer = SSLTrainer(task, iters_per_epoch=2)
    batch = _batch("lafs")
    # the whole view: one pixel is only sampled if a (random, untrained) landmark's patch happens to cover it
    batch["augmented"][0, 0] = float("nan")
    before = copy.deepcopy(task.student.state_dict())
    with pytest.raises(NonFiniteLossError, match="iteration 0"):
        trainer.train_step(batch, 0)
    assert all(torch.equal(v, before[k]) for k, v in task.student.state_dict().items())


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    task = build_ssl_task(_cfg("lafs"), _landmark_net())
    trainer = SSLTrainer(task, iters_per_epoch=2)
    trainer.train_step(_batch("lafs"), 2)
    save_checkpoint(
        {**trainer.state_dict(), "rng": rng_state(), "config": task.cfg.model_dump(mode="json"), "iteration": 3},
        tmp_path / "last.pt",
    )
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind

    state = load_checkpoint(tmp_path / "last.pt")
    twin = build_ssl_task(SSLParams(**state["config"]), copy.deepcopy(task.landmark_net))  # frozen, own file
    twin_trainer = SSLTrainer(twin, iters_per_epoch=2)
    twin_trainer.load_state_dict(state)
    set_rng_state(state["rng"])
    assert state["iteration"] == 3
    twin.eval(), task.eval()
    x = torch.rand(2, 3, 112, 112)
    pts = torch.rand(2, 68, 2) * 100
    for a, b in ((task.student, twin.student), (task.teacher, twin.teacher)):
        torch.testing.assert_close(a.backbone(x, pts), b.backbone(x, pts), rtol=0, atol=0)
    torch.testing.assert_close(task.loss.center, twin.loss.center, rtol=0, atol=0)
    # the optimizer continues identically
    torch.manual_seed(1)
    m1 = trainer.train_step(_batch("lafs", seed=5), 3)
    torch.manual_seed(1)
    m2 = twin_trainer.train_step(_batch("lafs", seed=5), 3)
    assert m1["loss"] == m2["loss"]


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


class _Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": torch.zeros(2), "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_state_resumes_refuses_or_sets_aside_a_changed_checkpoint(tmp_path):
    last = tmp_path / "last.pt"
    config, inputs = {"lr": 1e-3, "epochs": 2}, {"split": "ab12"}
    kwargs = {"stage": "pretrain", "input_names": "SSL split", "restart_on_change": False}
    assert resume_state(last, config, inputs, **kwargs) is None  # nothing to resume
    save_checkpoint({"iteration": 7, "config": config, "inputs": inputs}, last)
    assert resume_state(last, config, inputs, **kwargs)["iteration"] == 7
    for other_config, other_inputs, named in (
        ({**config, "lr": 2e-3}, inputs, "params lr 0.001 -> 0.002"),
        (config, {"split": "cd34"}, "input split"),
    ):
        with pytest.raises(ChangedCheckpointError, match=r"different pretrain params or inputs \(SSL split\)") as err:
            resume_state(last, other_config, other_inputs, **kwargs)
        assert named in str(err.value) and "epochs" not in str(err.value)
    assert last.exists()
    # a DDP rank other than 0: waits at the barrier, decides "start over", leaves the file to rank 0
    waited = []
    assert (
        resume_state(
            last,
            {**config, "lr": 2e-3},
            inputs,
            **{**kwargs, "restart_on_change": True},
            set_aside=False,
            before_set_aside=lambda: waited.append(1),
        )
        is None
    )
    assert waited == [1] and last.exists()
    assert resume_state(last, {**config, "lr": 2e-3}, inputs, **{**kwargs, "restart_on_change": True}) is None
    assert not last.exists() and load_checkpoint(tmp_path / "last.previous.pt")["iteration"] == 7


def test_resolve_device_names_the_param_when_cuda_is_missing():
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(StageError, match=r"finetune\.device is cuda"):
            resolve_device("cuda", param="finetune.device")
