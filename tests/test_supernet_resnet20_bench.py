"""The trained ResNet-20 supernet benchmark (benchmarks/serve/supernet_resnet20.py, ``--setup cifar``):
the supernet starts from a float checkpoint (its float sub-net then equals the float model bit for
bit), the per-epoch validation callback selects on the mean over sub-nets (brute force), the
setup's defaults fill unset options, and the table's differences follow from its numbers."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.models import build_model
from lowbit.nn.supernet import Supernet

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "serve" / "supernet_resnet20.py"
    spec = importlib.util.spec_from_file_location("supernet_resnet20_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module of their annotations
    spec.loader.exec_module(mod)
    return mod


def _float_checkpoint(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(7)
    model = build_model("resnet20").eval()
    with torch.no_grad():  # BatchNorm statistics away from their defaults, so that they matter
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_supernet_from_a_float_checkpoint_keeps_its_weights(bench, tmp_path: Path) -> None:
    ref, path = _float_checkpoint(tmp_path)
    setup = bench.SETUPS["cifar"]
    subnets = [{"name": "b2", "width": 1.0, "bits": 2}, {"name": "float", "width": 1.0, "bits": 32}]
    x = torch.randn(4, 3, 32, 32)
    sn = bench.build(setup, subnets, str(path)).eval()
    with torch.no_grad():
        want = ref(x)
        assert torch.equal(sn.run(x, "float"), want)  # every layer, BatchNorm and shortcut as loaded
        assert not torch.allclose(sn.run(x, "b2"), want, atol=1e-3)  # the 2-bit sub-net does quantize
        scratch = bench.build(setup, subnets, None).eval()
        assert not torch.allclose(scratch.run(x, "float"), want, atol=1e-3)
    # every sub-net's BatchNorm starts from the checkpoint's statistics
    bn = dict(sn.model.named_modules())["layer2.0.bn1"]
    for copy in bn.bns:
        assert torch.equal(copy.running_var, ref.layer2[0].bn1.running_var)
    # the cifar setup's activation quantizer (PACT, alpha_init 10) is the one built
    alphas = {float(m.alpha.detach()) for m in sn.modules() if hasattr(m, "alpha")}
    assert alphas == {setup.activation["alpha_init"]}


def test_subnet_val_is_the_mean_of_every_subnets_accuracy(bench) -> None:
    torch.manual_seed(0)
    sn = Supernet(nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                nn.Linear(8, 3)),
                  [{"name": "b2", "bits": 2}, {"name": "half", "width": 0.5}, {"name": "full"}], (6,))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(3)]
    sn.set_subnet("half")
    trainer = argparse.Namespace(model=sn)
    metrics: dict = {}
    bench.SubnetVal(batches).on_epoch_end(trainer, 0, metrics)
    assert sn.subnet == "half"  # the training sub-net is restored
    want = {}
    with torch.no_grad():
        for n in sn.names:
            hits = sum(int((sn.run(x, n).argmax(1) == y).sum()) for x, y in batches)
            want[n] = hits / 15
    assert {n: metrics[f"val_acc/{n}"] for n in sn.names} == pytest.approx(want, abs=0)
    assert metrics["val_acc"] == pytest.approx(sum(want.values()) / 3, abs=1e-12)
    assert len(set(want.values())) > 1  # the sub-nets differ, so a mean over one of them would show


def test_cifar_setup_defaults_and_sizes(bench) -> None:
    a = argparse.Namespace(setup="cifar", subset=0, val=5000, test_n=10000)
    assert bench.data_sizes(a) == {"train_images": 45_000, "val_images": 5_000, "test_images": 10_000}
    a.subset, a.val, a.test_n = 15_000, 1_000, 20_000
    assert bench.data_sizes(a) == {"train_images": 15_000, "val_images": 1_000, "test_images": 10_000}
    wb = argparse.Namespace(setup="cifar-wb", subset=30_000, val=5000, test_n=10000)
    assert bench.data_sizes(wb)["train_images"] == 30_000  # the campaign split, as cifar
    tiny = argparse.Namespace(setup="tiny", subset=2500, val=500, test_n=1000)
    assert bench.data_sizes(tiny)["train_images"] == 2000
    cifar = bench.SETUPS["cifar"]
    assert [s["bits"] for s in cifar.subnets] == [2, 4, 8] and cifar.select_on_val
    assert cifar.defaults["init"] == bench.FLOAT_INIT and cifar.stem == "supernet_resnet20_cifar"
    assert bench.SETUPS["tiny"].stem == "serve_resnet20"  # the earlier table keeps its name


def test_float_init_reads_the_float_runs_result(bench, tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text('{"best_acc": 0.8586, "test_acc": 0.847}')
    assert bench.float_init(str(tmp_path / "best.safetensors")) == {"val_acc": 0.8586, "test_acc": 0.847,
                                                                    "sha256": None}
    (tmp_path / "best.safetensors").write_bytes(b"weights")
    fl = bench.float_init(str(tmp_path / "best.safetensors"))
    assert len(fl["sha256"]) == 16
    # a results file started from the same float model: same SHA-256, or (older files) same accuracies
    assert bench.same_init({"float_init": fl}, fl)
    assert not bench.same_init({"float_init": {**fl, "sha256": "0" * 16}}, fl)
    assert bench.same_init({"float_init": {"val_acc": 0.8586, "test_acc": 0.847}}, fl)
    assert not bench.same_init({"float_init": {"val_acc": 0.86, "test_acc": 0.85}}, fl)
    assert not bench.same_init({}, fl)
    assert bench.float_init(None) == {}
    assert bench.float_init(str(tmp_path / "missing" / "best.safetensors")) == {}


def test_cifar_table_differences_follow_from_the_numbers(bench) -> None:
    rows = []
    for i, n in enumerate(["b2", "b4", "b8"]):
        rows.append({"name": n, "weight_bytes": 100 + i, "report_bops": 1000 * (i + 1), "packed_b1_ms": 1.0,
                     "packed_b8_ms": 2.0, "packed_b32_ms": 3.0, "sandwich_val": 0.5,
                     "sandwich_test": 0.80 + i / 100,
                     "des_val": 0.5, "des_test": 0.79 + i / 100, "alone_val": 0.5, "alone_test": 0.78})
    del rows[2]["alone_val"], rows[2]["alone_test"]
    p = {"command": "python x", "train_images": 45000, "val_images": 5000, "test_images": 10000,
         "torch": "t", "epochs": 3, "runs": {"sandwich": {"epoch_s": [1.0], "best_epoch": 1}},
         "init": "f", "float_init": {"val_acc": 0.85, "test_acc": 0.84}, "chosen_variant": "sandwich",
         "file": {"file_bytes": 1, "stored_tensor_bytes": 1, "subnet_tensor_bytes": 1,
                  "largest_subnet_bytes": 1, "latent_bytes": 1},
         "subnets": [{"name": n, "bits": b} for n, b in (("b2", 2), ("b4", 4), ("b8", 8))], "rows": rows}
    md = bench.markdown_cifar(p, ["sandwich", "des"])
    b2 = next(line for line in md.splitlines() if line.startswith("| b2 "))
    assert b2.endswith("| +2.00 | +1.00 | - |")
    assert "| not trained | - | - |" in md
    # sandwich - alone over b2 (+2) and b4 (+3); des - sandwich -1 on every sub-net
    assert "`sandwich` minus alone, test accuracy, mean over the 2 sub-nets trained alone: +2.50 pp" in md
    assert "`des` minus `sandwich` at equal epochs, test accuracy, mean over sub-nets: -1.00 pp" in md



def _row(name: str, **acc: float) -> dict:
    """A report row with unit costs and the given accuracies."""
    return {"name": name, "weight_bytes": 1, "report_bops": 1, "packed_b1_ms": 1.0, "packed_b8_ms": 2.0,
            "packed_b32_ms": 3.0, **acc}


def _widths_payload(subnets: list, rows: list, **extra: object) -> dict:
    """A widths-setup results payload around ``rows`` (what ``markdown_cifar`` reads)."""
    return {"command": "python x", "train_images": 30000, "val_images": 5000, "test_images": 10000,
            "torch": "t", "epochs": 3, "runs": {}, "init": "f", "float_init": {},
            "chosen_variant": "sandwich",
            "file": dict.fromkeys(("file_bytes", "stored_tensor_bytes", "subnet_tensor_bytes",
                                   "largest_subnet_bytes", "latent_bytes"), 1),
            "subnets": subnets, "rows": rows, **extra}


def test_widths_table_names_widths_and_the_full_width_alone_runs(bench, tmp_path: Path) -> None:
    setup = bench.SETUPS["cifar-wb"]
    assert [(s["width"], s["bits"]) for s in setup.subnets] == [(w, b) for w in (0.5, 1.0) for b in (2, 4, 8)]
    assert setup.alone == ["w0.5-b2", "w0.5-b4", "w0.5-b8"] and setup.select_on_val
    fl = {"val_acc": 0.85, "test_acc": 0.84}
    ref = {"git": {"commit": "abc1234567"}, "float_init": fl,
           "rows": [{"name": "b2", "alone_val": 0.6, "alone_test": 0.65}, {"name": "b4"}]}
    (tmp_path / "supernet_resnet20_cifar.json").write_text(__import__("json").dumps(ref))
    fw = bench.full_width_alone(setup, tmp_path, fl)["full_width_alone"]
    assert fw["rows"] == {"w1.0-b2": {"val": 0.6, "test": 0.65}}  # rows without an alone run are left out
    assert bench.full_width_alone(bench.SETUPS["cifar"], tmp_path, fl) == {}
    assert bench.full_width_alone(bench.SETUPS["cifar-alr"], tmp_path, fl) == {}  # no widths to set beside
    # runs from another float model are not set beside these
    assert bench.full_width_alone(setup, tmp_path, {"val_acc": 0.86, "test_acc": 0.83}) == {}
    # each width setup beside the bit-width runs of its own recipe: cifar-wbo-l2's clip rate and penalty
    want = {"cifar-wb": "cifar", "cifar-wbo": "cifar", "cifar-nu": "cifar", "cifar-wbo-l2": "cifar-l2"}
    assert {n: bench.bits_twin(bench.SETUPS[n]) for n in want} == want
    assert bench.full_width_alone(bench.SETUPS["cifar-wbo-l2"], tmp_path, fl) == {}  # cifar-l2's file absent
    rows = [_row(n, sandwich_val=0.5, sandwich_test=t) for n, t in (("w0.5-b2", 0.40), ("w1.0-b2", 0.70))]
    rows[0].update(alone_val=0.5, alone_test=0.45)
    p = _widths_payload([s for s in setup.subnets if s["bits"] == 2], rows, load="L", full_width_alone=fw)
    md = bench.markdown_cifar(p, ["sandwich"])
    assert "| w0.5-b2 | 0.5 | 2/2 |" in md and "| w1.0-b2 | 1.0 | 2/2 |" in md
    assert "| -5.00 |" in md  # 40% in the supernet, 45% alone
    assert "w1.0-b2 65.00% test (in `sandwich` 70.00%, +5.00 pp)" in md and "git abc1234567" in md
    assert "(L)" in md


def test_ordered_setup_builds_ordered_and_sets_each_subnet_beside_the_unordered_run(bench, tmp_path) -> None:
    setup = bench.SETUPS["cifar-wbo"]
    assert setup.order == "l1" and setup.base == "cifar-wb"
    assert setup.subnets == bench.SETUPS["cifar-wb"].subnets
    sn = bench.build(setup, setup.subnets[:1], None)
    assert sn.order == "l1" and sn.model.layer2[0].downsample.base.front == 8
    assert bench.build(bench.SETUPS["cifar-wb"], setup.subnets[:1], None).order is None
    fl = {"val_acc": 0.85, "test_acc": 0.84, "sha256": "ab" * 8}
    ref = {"git": {"commit": "0123456789ab"}, "float_init": fl,
           "rows": [{"name": "w0.5-b4", "sandwich_test": 0.50, "alone_test": 0.66}, {"name": "w1.0-b4"}]}
    (tmp_path / "supernet_resnet20_cifar_wb.json").write_text(__import__("json").dumps(ref))
    un = bench.base_runs(setup, tmp_path, fl)["base"]
    assert un["rows"]["w0.5-b4"] == {"sandwich_test": 0.50, "alone_test": 0.66}
    assert bench.base_runs(bench.SETUPS["cifar-wb"], tmp_path, fl) == {}
    assert bench.base_runs(setup, tmp_path, {**fl, "sha256": "cd" * 8}) == {}
    rows = [_row("w0.5-b4", sandwich_val=0.6, sandwich_test=0.62, alone_val=0.6, alone_test=0.69)]
    p = _widths_payload([s for s in setup.subnets if s["bits"] == 4], rows, order="l1", base=un)
    md = bench.markdown_cifar(p, ["sandwich"])
    assert "sorted by importance" in md and "not reordered" not in md
    assert "w0.5-b4 sandwich 62.00% vs 50.00% (+12.00 pp), alone 69.00% vs 66.00% (+3.00 pp)" in md


def test_activation_stats_count_inputs_below_half_a_step(bench) -> None:
    torch.manual_seed(0)
    first = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(4))  # the quantized layer sees relu(x) exactly
    sn = Supernet(nn.Sequential(first, nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                  [{"name": "b2", "bits": 2}], (4,), activation={"method": "pact", "alpha_init": 3.0}).eval()
    x = torch.tensor([[0.1, 0.4, 0.6, 2.0], [-1.0, 0.49, 0.51, 5.0]])
    st = bench.activation_stats(sn, [(x, torch.zeros(2, dtype=torch.long))])["b2"]
    # 2 bits, clip 3: step 1, so positive inputs below 0.5 round to zero: 0.1, 0.4, 0.49 of 7 positive
    assert st["act_zeroed"] == pytest.approx(3 / 7, abs=1e-12)
    assert st["pact_alpha_min"] == st["pact_alpha_max"] == 3.0


def test_non_uniform_setup_has_per_stage_widths_and_names_them(bench) -> None:
    setup = bench.SETUPS["cifar-nu"]
    assert setup.order == "l1" and setup.base is None and setup.select_on_val
    staged = {s["name"]: s["width"] for s in setup.subnets if isinstance(s["width"], dict)}
    assert staged == {"up-b4": {"layer1.*": 0.5, "layer2.*": 0.75, "layer3.*": 1.0},
                      "down-b4": {"layer1.*": 1.0, "layer2.*": 0.75, "layer3.*": 0.5}}
    assert {s["bits"] for s in setup.subnets} == {4} and set(setup.alone) < {s["name"] for s in setup.subnets}
    sn = bench.build(setup, setup.subnets, None)
    # active channels per channel group of the three stages (16 / 32 / 64 channels at full width; the
    # input and the classifier's outputs are not sliced)
    full = {g: c for g, c in sn.plan("w1.0-b4").channels.items() if c in (16, 32, 64)}
    for name, widths in (("up-b4", (0.5, 0.75, 1.0)), ("down-b4", (1.0, 0.75, 0.5))):
        got = sn.plan(name).channels
        for stage, c in enumerate((16, 32, 64)):
            assert {got[g] for g in full if full[g] == c} == {round(widths[stage] * c)}, (name, stage)
    bops = {n: sn.cost(n)["bops"] for n in sn.names}
    for name in ("up-b4", "down-b4"):
        assert bops["w0.5-b4"] < bops[name] < bops["w1.0-b4"]
    rows = [{**_row(s["name"], sandwich_val=0.5, sandwich_test=0.6), "report_bops": bops[s["name"]]}
            for s in setup.subnets]
    md = bench.markdown_cifar(_widths_payload(setup.subnets, rows, order="l1"), ["sandwich"])
    assert "| up-b4 | 0.5 / 0.75 / 1.0 | 4/4 |" in md and "| down-b4 | 1.0 / 0.75 / 0.5 | 4/4 |" in md
    assert "| w0.75-b4 | 0.75 | 4/4 |" in md
    assert "per-stage widths up-b4 0.5 / 0.75 / 1.0; down-b4 1.0 / 0.75 / 0.5" in md
    assert "the largest sub-net (w1.0-b4), the smallest (w0.5-b4) and one of the other 3" in md


def test_seed_paths_move_the_work_directory_and_the_default_float_model(bench) -> None:
    assert bench.seed_paths("runs/x", bench.FLOAT_INIT, 0) == ("runs/x", bench.FLOAT_INIT)
    work, init = bench.seed_paths("runs/x", bench.FLOAT_INIT, 2)
    assert work == "runs/x-seed2" and init == "runs/cifar10-claims/cpu/float/seed2/best.safetensors"
    assert bench.seed_paths("runs/x", "mine.safetensors", 1) == ("runs/x-seed1", "mine.safetensors")
    assert bench.seed_paths("runs/x", "none", 1) == ("runs/x-seed1", None)


def test_seeds_table_gathers_each_seeds_runs_and_differences_seed_by_seed(bench, tmp_path: Path) -> None:
    import json

    # seed s: sandwich 0.80 + s/100 on every sub-net, des 1 pp below it, alone 0.78; seed 2 has no des
    for s in (0, 1, 2):
        work = tmp_path / ("w" if s == 0 else f"w-seed{s}")
        runs = {"sandwich": 0.80 + s / 100, "alone-b2": 0.78, "alone-b4": 0.78, "alone-b8": 0.78}
        if s < 2:
            runs["des"] = 0.79 + s / 100
        for run, acc in runs.items():
            names = ["b2", "b4", "b8"] if not run.startswith("alone-") else [run[len("alone-"):]]
            (work / run).mkdir(parents=True)
            (work / run / "result.json").write_text(json.dumps(
                {"val": dict.fromkeys(names, 0.5), "test": dict.fromkeys(names, acc), "epoch_s": [1.0]}))
    a = argparse.Namespace(work=str(tmp_path / "w"), init="none", seeds=[0, 1, 2, 3], out=str(tmp_path),
                           epochs=3, subset=30000, val=5000, test_n=10000, setup="cifar")
    bench.seeds_table(bench.SETUPS["cifar"], a, ["seeds"], 0.0)
    p = json.loads((tmp_path / "supernet_resnet20_cifar_seeds.json").read_text())
    assert p["seeds"] == [0, 1, 2]  # seed 3 has no runs
    b4 = next(r for r in p["rows"] if r["name"] == "b4")
    assert b4["sandwich_test"]["n"] == 3 and abs(b4["sandwich_test"]["mean"] - 0.81) < 1e-9
    assert abs(b4["sandwich_test"]["std"] - 0.01) < 1e-9
    assert b4["des_test"]["n"] == 2 and abs(b4["des_minus_sandwich"]["mean"] + 0.01) < 1e-9
    assert abs(p["summary"]["sandwich_minus_alone"]["mean"] - 0.03) < 1e-9
    assert p["summary"]["des_minus_sandwich"]["n"] == 2
    md = (tmp_path / "supernet_resnet20_cifar_seeds.md").read_text()
    assert "| b4 | 81.00 ± 1.00 (n=3) | 79.50 ± 0.71 (n=2) | 78.00 ± 0.00 (n=3) | +3.00 ± 1.00 (n=3) |" in md
    assert "`des` minus `sandwich` at equal epochs, test accuracy, each seed's mean over every sub-net: " \
           "-1.00 ± 0.00 (n=2) pp" in md
    assert (tmp_path / "supernet_resnet20_cifar_seeds.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no finished runs"):
        bench.seeds_table(bench.SETUPS["cifar"], argparse.Namespace(**{**vars(a), "seeds": [5]}), [], 0.0)


def test_clip_rate_setup_gives_pacts_clip_its_own_rate_and_sets_each_subnet_beside_the_cifar_run(
        bench, tmp_path: Path) -> None:
    setup = bench.SETUPS["cifar-alr"]
    assert setup.base == "cifar" and setup.subnets == bench.SETUPS["cifar"].subnets
    sn = bench.build(setup, setup.subnets, None)
    rates = {m.param_lr for m in sn.modules() if hasattr(m, "alpha")}
    assert rates == {1e-2}  # the Trainer puts every clip in its own optimizer group at this rate
    fl = {"val_acc": 0.85, "test_acc": 0.84}
    ref = {"git": {"commit": "0123456789ab"}, "float_init": fl,
           "rows": [{"name": "b2", "sandwich_test": 0.70, "alone_test": 0.69}]}
    (tmp_path / "supernet_resnet20_cifar.json").write_text(__import__("json").dumps(ref))
    base = bench.base_runs(setup, tmp_path, fl)["base"]
    assert base["what"] == "with the clip at the model's learning rate"
    rows = [_row("b2", sandwich_val=0.8, sandwich_test=0.79, alone_val=0.8, alone_test=0.785)]
    p = {**_widths_payload(setup.subnets[:1], rows, base=base), "activation": setup.activation}
    md = bench.markdown_cifar(p, ["sandwich"])
    assert "alpha_init 10, the clip at its own learning rate 0.01" in md
    assert "with the clip at the model's learning rate" in md
    assert "b2 sandwich 79.00% vs 70.00% (+9.00 pp), alone 78.50% vs 69.00% (+9.50 pp)" in md


def test_l2_setup_adds_pacts_penalty_on_every_clip_and_says_so(bench, tmp_path: Path, monkeypatch) -> None:
    from lowbit.quant.pact import PACTActivation

    setup = bench.SETUPS["cifar-l2"]
    assert setup.base == "cifar-alr" and setup.pact_l2 == 2e-4
    assert setup.activation == bench.SETUPS["cifar-alr"].activation

    class BuiltError(Exception):
        pass

    seen = {}

    def trainer(model, *args, regularizers=(), **kw):
        seen["model"], seen["regs"] = model, list(regularizers)
        raise BuiltError

    monkeypatch.setattr(bench, "Trainer", trainer)
    a = argparse.Namespace(work=str(tmp_path), init=None, epochs=1, seed=0)
    wl2 = bench.SETUPS["cifar-wbo-l2"]  # the width supernet with the same activation recipe
    assert (wl2.activation, wl2.pact_l2, wl2.base, wl2.order) == (setup.activation, 2e-4, "cifar-wbo", "l1")
    assert wl2.subnets == bench.SETUPS["cifar-wbo"].subnets and wl2.alone == bench.SETUPS["cifar-wbo"].alone
    for name, want in (("cifar-l2", 1), ("cifar-alr", 0), ("cifar-wbo-l2", 1), ("cifar-wbo", 0)):
        with pytest.raises(BuiltError):
            bench.train_one(bench.SETUPS[name], "sandwich", a, ([None], None, None))
        assert len(seen["regs"]) == want
    with pytest.raises(BuiltError):
        bench.train_one(setup, "sandwich", a, ([None], None, None))
    clips = [m.alpha for m in seen["model"].modules() if isinstance(m, PACTActivation)]
    assert len(clips) == 3 * 18  # a clip per quantized layer and bit-width (2/4/8)
    with torch.no_grad():
        for i, c in enumerate(clips):
            c.fill_(1.0 + i)
    (reg,) = seen["regs"]
    assert reg(seen["model"]).item() == pytest.approx(2e-4 * sum((1.0 + i) ** 2 for i in range(len(clips))))
    assert "L2 penalty 0.0002 on the clips" in bench._act({"activation": setup.activation, "pact_l2": 2e-4})


def test_seeds_table_beside_a_base_setup_subtracts_its_runs_seed_by_seed(bench, tmp_path: Path,
                                                                         monkeypatch) -> None:
    import json
    from dataclasses import replace

    def write(work: Path, runs: dict[str, float], init: str) -> None:
        for run, acc in runs.items():
            names = ["b2", "b4", "b8"] if not run.startswith("alone-") else [run[len("alone-"):]]
            (work / run).mkdir(parents=True)
            (work / run / "result.json").write_text(json.dumps(
                {"init": init, "val": dict.fromkeys(names, 0.5), "test": dict.fromkeys(names, acc)}))

    monkeypatch.setitem(bench.SETUPS, "cifar", replace(bench.SETUPS["cifar"], work=str(tmp_path / "base")))
    for s in (0, 1):  # this setup 5 + s pp above the base on the supernet, 7 pp on the 2-bit one alone
        sfx = "" if s == 0 else f"-seed{s}"
        write(tmp_path / f"l2{sfx}", {"sandwich": 0.80 + s / 100, "alone-b2": 0.77}, f"float{s}")
        write(tmp_path / f"base{sfx}", {"sandwich": 0.75, "alone-b2": 0.70, "alone-b4": 0.8}, f"float{s}")
    a = argparse.Namespace(work=str(tmp_path / "l2"), init="none", seeds=[0, 1], out=str(tmp_path), epochs=3,
                           subset=30000, val=5000, test_n=10000, setup="cifar-l2", beside="cifar")
    bench.seeds_table(bench.SETUPS["cifar-l2"], a, ["seeds"], 0.0)
    p = json.loads((tmp_path / "supernet_resnet20_cifar_l2_seeds.json").read_text())
    assert p["beside"] == "cifar" and p["beside_differs"] == [
        "without PACT's L2 penalty on the clips", "with the clip at the model's learning rate"]
    b2, b4 = (next(r for r in p["rows"] if r["name"] == n) for n in ("b2", "b4"))
    assert b2["sandwich_minus_beside"]["n"] == 2 and abs(b2["sandwich_minus_beside"]["mean"] - 0.055) < 1e-9
    assert abs(b2["alone_minus_beside"]["mean"] - 0.07) < 1e-9 and b2["alone_minus_beside"]["std"] < 1e-9
    assert b4["alone_minus_beside"] is None  # no alone-b4 run of this setup to pair
    md = (tmp_path / "supernet_resnet20_cifar_l2_seeds.md").read_text()
    assert "sandwich - cifar (pp)" in md and "+5.50 ± 0.71 (n=2)" in md
    assert "with the clip at the model's learning rate" in md
    with pytest.raises(ValueError, match="not a base setup"):
        bench.differences_to("cifar-l2", "cifar-wb")
    write(tmp_path / "l2-seed2", {"sandwich": 0.8}, "float2")  # paired with a run from another float model
    write(tmp_path / "base-seed2", {"sandwich": 0.8}, "elsewhere")
    with pytest.raises(SystemExit, match="different float models"):
        bench.seeds_table(bench.SETUPS["cifar-l2"], argparse.Namespace(**{**vars(a), "seeds": [2]}), [], 0.0)


def test_seeds_table_takes_full_width_alone_from_the_bit_width_twin(bench, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """A widths x bits setup's 3-seed table fills its full-width "alone" cells from its bit-width
    twin's runs alone of the same seed (renamed ``w1.0-<bits>``), and only where they started from the
    same float model; the mean over sub-nets then counts them."""
    import json
    from dataclasses import replace

    def write(work: Path, run: str, names: list[str], acc: float, init: str) -> None:
        (work / run).mkdir(parents=True)
        (work / run / "result.json").write_text(json.dumps(
            {"init": init, "val": dict.fromkeys(names, 0.5), "test": dict.fromkeys(names, acc)}))

    setup = bench.SETUPS["cifar-wbo-l2"]
    names = [s["name"] for s in setup.subnets]
    twin = replace(bench.SETUPS["cifar-l2"], work=str(tmp_path / "twin"))
    monkeypatch.setitem(bench.SETUPS, "cifar-l2", twin)
    for s in (0, 1):
        sfx = "" if s == 0 else f"-seed{s}"
        write(tmp_path / f"wbo{sfx}", "sandwich", names, 0.70, f"float{s}")
        for n in setup.alone:  # the half-width configurations alone
            write(tmp_path / f"wbo{sfx}", f"alone-{n}", [n], 0.72, f"float{s}")
        for b in ("b2", "b4", "b8"):  # seed 1's twin started from another float model: not paired
            write(tmp_path / f"twin{sfx}", f"alone-{b}", [b], 0.80, "float0" if s == 0 else "elsewhere")
    got = bench.twin_alone("cifar-l2", None, 0, bench.seed_runs(setup, str(tmp_path / "wbo")))
    assert set(got) == {"alone-w1.0-b2", "alone-w1.0-b4", "alone-w1.0-b8"}
    assert got["alone-w1.0-b4"]["test"] == {"w1.0-b4": 0.80}
    assert bench.twin_alone("cifar-l2", None, 1, bench.seed_runs(setup, str(tmp_path / "wbo-seed1"))) == {}
    a = argparse.Namespace(work=str(tmp_path / "wbo"), init="none", seeds=[0, 1], out=str(tmp_path), epochs=3,
                           subset=30000, val=5000, test_n=10000, setup="cifar-wbo-l2", beside=None)
    bench.seeds_table(setup, a, ["seeds"], 0.0)
    p = json.loads((tmp_path / f"{setup.stem}_seeds.json").read_text())
    assert p["full_width_alone_from"] == "cifar-l2"
    row = next(r for r in p["rows"] if r["name"] == "w1.0-b4")
    assert row["alone_test"]["n"] == 1 and abs(row["sandwich_minus_alone"]["mean"] + 0.10) < 1e-9
    # w1.0 has its alone runs in seed 0 only: the per-seed mean over sub-nets keeps the half widths
    assert abs(p["summary"]["sandwich_minus_alone"]["mean"] + 0.02) < 1e-9
    assert "`cifar-l2`'s runs alone of the same seeds" in (tmp_path / f"{setup.stem}_seeds.md").read_text()
