"""Knowledge distillation and DCQ: closed forms, sections, independence of the sections' gradients,
and end-to-end runs through lowbit.experiment with a teacher run directory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.experiment import RunSpec, train_run
from lowbit.models import build_model
from lowbit.recipe import RecipeError
from lowbit.train.dcq import DCQ, split_sections
from lowbit.train.distill import KnowledgeDistillation, kd_loss
from lowbit.train.methods import build_methods

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_loss_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    assert torch.allclose(kd_loss(zs, zt, y, alpha=0.0), F.cross_entropy(zs, y))
    t = 3.0
    pt, ps = F.softmax(zt / t, 1), F.softmax(zs / t, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    assert torch.allclose(kd_loss(zs, zt, y, alpha=1.0, temperature=t), t * t * kl, atol=1e-6)
    mixed = 0.25 * F.cross_entropy(zs, y) + 0.75 * t * t * kl
    assert torch.allclose(kd_loss(zs, zt, y, alpha=0.75, temperature=t), mixed, atol=1e-6)
    assert float(kd_loss(zt, zt, y, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    # gradient of the soft term: T (softmax(z_s/T) - softmax(z_t/T)) / batch
    zs.requires_grad_(True)
    (grad,) = torch.autograd.grad(kd_loss(zs, zt, y, alpha=1.0, temperature=t), zs)
    torch.testing.assert_close(grad, t * (ps - pt) / 6, rtol=1e-4, atol=1e-6)


def test_teacher_is_frozen() -> None:
    torch.manual_seed(0)
    teacher = build_model("lenet5")
    before = copy.deepcopy(teacher.state_dict())
    kd = KnowledgeDistillation(teacher, alpha=0.5)
    student = lowbit.quantize(build_model("lenet5"), {"default": {"weight": {"method": "binary", "bits": 1}}})
    student.train()
    loss, logits = kd(student, torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    loss.backward()
    assert logits.shape == (8, 10) and not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics did not move
    with pytest.raises(ValueError, match="alpha must be a number in"):
        KnowledgeDistillation(teacher, alpha=1.5)
    with pytest.raises(ValueError, match="teacher must be a torch module"):
        KnowledgeDistillation("runs/fp")  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "kw", "shape", "cut", "n"), [
    ("lenet5", {}, (1, 28, 28), None, 3),
    ("mlp", {}, (1, 28, 28), ["relu1"], 2),
    ("resnet20", {}, (3, 32, 32), None, 5),
    ("vgg_small", {}, (3, 32, 32), None, None),
])
def test_sections_compose_to_the_model(name, kw, shape, cut, n) -> None:
    torch.manual_seed(0)
    model = build_model(name, **kw).eval()
    sections = split_sections(model, cut)
    if n is not None:
        assert len(sections) == n
    x = torch.randn(2, *shape)
    h = x
    for s in sections:
        h = s(h)
    with torch.no_grad():
        assert torch.equal(h, model(x))
    # the sections hold the model's own modules (training them trains the model)
    own = {id(p) for p in model.parameters()}
    assert {id(p) for s in sections for p in s.parameters()} == own


def test_section_errors() -> None:
    with pytest.raises(ValueError, match="not children of the model"):
        split_sections(build_model("lenet5"), ["pool9"])
    with pytest.raises(ValueError, match="empty section"):
        split_sections(build_model("lenet5"), ["fc3"])
    with pytest.raises(ValueError, match="no pooling layer"):
        split_sections(build_model("mlp"))
    with pytest.raises(ValueError, match="dcq_sections"):
        split_sections(nn.Module())
    with pytest.raises(ValueError, match="own sections"):
        split_sections(build_model("resnet20"), ["layer1"])


def test_dcq_sections_learn_independently() -> None:
    """The summed loss's gradient on section k's parameters is L_k's gradient alone; a float student
    equal to its teacher has zero feature losses."""
    torch.manual_seed(0)
    teacher = build_model("lenet5").eval()
    student = copy.deepcopy(teacher)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    dcq = DCQ(student.eval(), teacher)
    losses, _ = dcq.section_losses(x, y)
    assert [float(v.detach()) for v in losses[:-1]] == [0.0, 0.0]
    lowbit.quantize(student, {"default": {"weight": {"method": "twn", "bits": 2},
                                          "activation": {"method": "pact", "bits": 2}}})
    student.train()
    dcq = DCQ(student, teacher, alpha=0.5)
    losses, z = dcq.section_losses(x, y)
    assert all(float(v.detach()) > 0 for v in losses) and z.shape == (16, 10)
    total = torch.stack(losses).sum()
    params = [list(s.parameters()) for s in dcq.s_sections]
    whole = torch.autograd.grad(total, [p for ps in params for p in ps], retain_graph=True, allow_unused=True)
    i = 0
    for k, ps in enumerate(params):
        alone = torch.autograd.grad(losses[k], ps, retain_graph=True, allow_unused=True)
        for a, b in zip(alone, whole[i:i + len(ps)], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        i += len(ps)
    # after dcq_epochs the loss is whole-model KD on the stitched student
    dcq = DCQ(student, teacher, dcq_epochs=1, alpha=1.0)
    dcq.on_epoch_start(None, 1)
    loss, z = dcq(student, x, y)
    with torch.no_grad():
        z_ref = student(x)
        ref = kd_loss(z_ref, teacher(x), y, alpha=1.0)
    assert not dcq.sectioned and torch.allclose(loss.detach(), ref, atol=1e-6)


def test_only_one_loss_and_teacher_required() -> None:
    t = build_model("lenet5")
    with pytest.raises(ValueError, match="both set the training loss"):
        build_methods([{"name": "kd", "teacher": t}, {"name": "dcq", "teacher": t}], build_model("lenet5"))
    with pytest.raises(ValueError, match=r"methods\[0\]\.teacher.*missing"):
        build_methods([{"name": "dcq"}], build_model("lenet5"))


def test_runs_with_a_teacher_run_directory(tmp_path: Path) -> None:
    """Float teacher run, then KD and DCQ students that name it in their recipes (digits, MLP).

    All 1,437 training images train (no validation split): with a tenth held out, two epochs
    of the 1-bit DCQ student land near the 50% bar and the check would test the split size."""
    common = {"model": "mlp", "model_kwargs": {"hidden": [64]}, "dataset": "digits", "batch_size": 64,
              "val_size": 0}
    fp = train_run(RunSpec(**common, train={"epochs": 3, "optimizer": "adam", "lr": 3e-3},
                           out=str(tmp_path / "fp")))
    assert fp.test_acc > 0.8
    quant = {"default": {"weight": {"method": "binary", "bits": 1},
                         "activation": {"method": "pact", "bits": 2}},
             "rules": [{"match": "@first", "activation": None}]}
    init = str(tmp_path / "fp" / "best.safetensors")
    for method in ({"name": "kd", "teacher": str(tmp_path / "fp"), "alpha": 0.7},
                   {"name": "dcq", "teacher": str(tmp_path / "fp"), "cut_after": ["relu1"], "dcq_epochs": 1}):
        out = tmp_path / method["name"]
        res = train_run(RunSpec(**common, recipe={**quant, "methods": [method]}, init=init,
                                train={"epochs": 2, "optimizer": "adam", "lr": 1e-3}, out=str(out)))
        assert res.test_acc > 0.5, method["name"]
        assert json.loads((out / "result.json").read_text())["test_acc"] == res.test_acc
        assert (out / "model.lowbit").is_file()
    with pytest.raises(RecipeError, match="does not exist"):
        missing = [{"name": "kd", "teacher": str(tmp_path / "no")}]
        train_run(RunSpec(**common, recipe={**quant, "methods": missing}, train={"epochs": 1}))
