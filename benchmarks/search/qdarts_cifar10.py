"""∇QDARTS on CIFAR-10 on one CPU core: search operations + bits, derive, retrain, compare.

    OMP_NUM_THREADS=1 python benchmarks/search/qdarts_cifar10.py --seeds 0 1 2   # ~25 min of one core
    OMP_NUM_THREADS=1 python benchmarks/search/qdarts_cifar10.py --arch-lr 0.03 --seeds 0 1 \
        --stem qdarts_cifar10_archlr --runs-dir runs/qdarts_cifar10_archlr   # a faster-moving architecture
    OMP_NUM_THREADS=1 python benchmarks/search/qdarts_cifar10.py --smoke    # a 1-minute dry run

Data: the CIFAR-10 JPEG image-folder zip (``--data-dir``, default ``../shared/data``; close to, not
identical with, the original files). A random ``--subset`` of the 50k training images is split
into a selection-validation set (``--val``, never trained on) and the rest; the search uses
``--search-n`` images of the rest, half for the weights and half (the architecture's validation
split) for alpha/gamma. Every net is then trained from scratch for ``--epochs`` on the rest, the
epoch with the best selection-validation accuracy is kept, and the 10k test set is read once per
net at the end.

Nets (same skeleton: float stem, ``--layers`` searchable layers of ``--channels`` channels, float
classifier): the float all-conv3x3 network; the searched net (derived ops and bits); the searched
ops in float; the searched ops at uniform W4A4 and W2A2; and the searched ops with ReLeQ's
per-convolution weight and activation bits at the searched net's BOPs. The search's BOPs target is
``1/--bops-ratio`` of the float network's searched-layer BOPs (the paper's 160x by default).

ReLeQ arm (``--releq-episodes``, 0 skips it): the PPO agent of :mod:`lowbit.search.releq` picks
``(b_w, b_a)`` from ``--releq-bits`` squared for each searched convolution of the derived
operations, under a hard budget of the searched net's measured BOPs (infeasible actions masked).
Its measurement: a ``--releq-proxy-epochs`` fine-tune (Adam 1e-3) on the search's weight split from
the float weights of the "searched ops, float" run (seed ``--seed``), accuracy on the selection-
validation images (never the test set); the exhaustive oracle over the same feasible set is
measured too (cached alike, ``releq_cache.json``).
Writes ``benchmarks/results/qdarts_cifar10.{json,md,png}``; runs live under ``--runs-dir`` and a
rerun resumes (the search from its per-epoch checkpoint, each training from its run directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lowbit.data import load_dataset
from lowbit.models import build_model, layer_table
from lowbit.nn.quantize import quantize
from lowbit.search.qdarts import (
    OPS,
    Choice,
    QDARTSConfig,
    SearchSpace,
    SuperNet,
    build_derived,
    derived_recipe,
    qdarts_search,
    searched_bops,
    searched_layer_names,
)
from lowbit.search.releq import FineTuneEvaluator, ReLeQ, exhaustive
from lowbit.train import TrainConfig, Trainer, atomic_write_text, evaluate, load_checkpoint, load_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

PAPER = {"bops_ratio": 160.0, "acc_delta_pt": -1.57,
         "source": "∇QDARTS (TMLR 2025) abstract, CIFAR-10, (2,4) bits"}


def train_net(name: str, model: torch.nn.Module, train: Any, val: Any, test: Any, a: argparse.Namespace,
              runs: Path, seed: int) -> dict[str, Any]:
    done = runs / name / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = TrainConfig(epochs=a.epochs, optimizer="sgd", lr=a.lr, momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", seed=seed, tensorboard=False)
    t0 = time.time()
    trainer = Trainer(model, train, val, cfg, runs / name)
    trainer.fit(resume=True)
    load_checkpoint(runs / name / "best.safetensors", model)  # the best selection-validation epoch
    res = {"name": name, "val_acc": float(evaluate(model, val)["acc"]),
           "test_acc": float(evaluate(model, test)["acc"]), "train_s": round(time.time() - t0, 1)}
    atomic_write_text(done, json.dumps(res) + "\n")
    return res


def final_probs(space: SearchSpace, ckpt: Path) -> list[dict[str, Any]]:
    """Per layer: softmax(alpha) and, for each op, softmax over its weight / activation bits."""
    net = SuperNet(space)
    load_checkpoint(ckpt, net)
    out = []
    with torch.no_grad():
        for cell in net.cells:
            p, q, r = cell.probs()
            out.append({"ops": list(cell.names), "p_op": p.tolist(), "p_w": q.tolist(), "p_a": r.tolist()})
    return out


def releq_net(space: SearchSpace, geno: list[Choice], bits: list[list[int]] | None) -> torch.nn.Module:
    """The derived operations as a fresh zoo net; ``bits[i] = [b_w, b_a]`` of searched conv ``i``
    (order of :func:`searched_layer_names`), stem and classifier float; ``None``: left float."""
    net = build_model("qdarts_cellnet", ops=[c.op for c in geno], channels=space.channels,
                      reductions=list(space.reductions), num_classes=space.num_classes,
                      in_channels=space.in_channels)
    if bits is not None:
        rules = [{"match": n, "weight": {**space.weight, "bits": w},
                  "activation": {**space.activation, "bits": b}}
                 for n, (w, b) in zip(searched_layer_names(geno), bits, strict=True)]
        quantize(net, {"name": "releq", "default": {"weight": None, "activation": None}, "rules": rules},
                 strict=True)
    return net


def releq_search(space: SearchSpace, geno: list[Choice], s_train: Any, sel_val: Any, budget: float,
                 a: argparse.Namespace, runs: Path) -> dict[str, Any]:
    """ReLeQ's per-conv (b_w, b_a) for the derived ops at <= ``budget`` BOPs (resumable: JSON cache),
    the oracle over the feasible set, and the proxy's noise (the agent's pick and the QDARTS bits
    re-measured with fine-tune seeds ``seed + 1``, ``seed + 2``)."""
    done = runs / "releq.json"
    out = json.loads(done.read_text()) if done.exists() else None
    if out is not None and "oracle_all" in out and "proxy_noise_seeds" in out:
        return out
    names = searched_layer_names(geno)
    fp_weights = runs / "searched_ops_float" / "best.safetensors"  # seed a.seed's plain run name

    def make_model() -> torch.nn.Module:
        torch.manual_seed(a.seed)
        m = releq_net(space, geno, None)
        load_weights(m, fp_weights)
        return m

    ref = make_model()
    macs = {r.name: r.macs for r in layer_table(ref, (space.in_channels, space.input_size, space.input_size))}

    def cost(bits: tuple[tuple[int, int], ...]) -> float:
        return float(sum(macs[n] * w * b for n, (w, b) in zip(names, bits, strict=True)))

    proxy = TrainConfig(epochs=a.releq_proxy_epochs, optimizer="adam", lr=1e-3, schedule="constant",
                        seed=a.seed, tensorboard=False)
    ev = FineTuneEvaluator(make_model, s_train, sel_val, proxy, weight=space.weight,
                           activation=space.activation, names=names)
    float_acc = float(evaluate(ref, sel_val)["acc"])
    modules = dict(ref.named_modules())
    ts = time.time()

    def search() -> ReLeQ:
        return ReLeQ(ev, [modules[n] for n in names], float_acc, actions=a.releq_bits,
                     act_actions=a.releq_bits, cost=cost, budget=budget, seed=a.seed,
                     cache_path=runs / "releq_cache.json")

    qd = tuple((c.w_bits, c.a_bits) for c in geno for _ in range(len(OPS[c.op](1, 1, 1))))
    if out is None:
        out = _releq_agent(search, cost, a, names, macs, budget, float_acc, proxy, ts, qd)
        atomic_write_text(done, json.dumps(out, indent=1) + "\n")
    if "oracle_all" not in out:  # every feasible assignment, all measured already (cache)
        out["oracle_all"] = [{"bits": [list(x) for x in b], "val_acc": acc, "cost": cost(b)}
                             for b, _, acc in exhaustive(search())]
    if "proxy_noise" not in out or "proxy_noise_seeds" not in out:
        # the fine-tune is deterministic given its data order (shuffle and augmentation follow the
        # loader's seed, not the config's): re-measure with two more loader seeds
        noise, seeds = {}, [s_train.seed, s_train.seed + 1, s_train.seed + 2]
        for label, bits in (("releq", tuple(map(tuple, out["bits"]))), ("qdarts", qd)):
            accs = [search().accuracy(bits)]
            for sd in seeds[1:]:
                ev_s = FineTuneEvaluator(make_model, s_train.replace(seed=sd), sel_val, proxy,
                                         weight=space.weight, activation=space.activation, names=names)
                accs.append(float(ev_s(bits)))
            noise[label] = accs
        out["proxy_noise"], out["proxy_noise_seeds"] = noise, seeds
    atomic_write_text(done, json.dumps(out, indent=1) + "\n")
    return out


def _releq_agent(search: Any, cost: Any, a: argparse.Namespace, names: list[str], macs: dict[str, int],
                 budget: float, float_acc: float, proxy: TrainConfig, ts: float, qd: tuple) -> dict[str, Any]:
    agent = search()
    res = agent.run(a.releq_episodes, progress=lambda i, h: print(
        f"releq episode {i + 1}/{a.releq_episodes}: {h['bits']} acc {h['acc']:.4f} reward {h['reward']:+.3f}",
        flush=True) if (i + 1) % 20 == 0 else None)
    agent_evals = len(agent.cache)
    oracle = exhaustive(search())
    rank = [tuple(b) for b, _, _ in oracle].index(tuple(res.best_bits))
    out = {"names": names, "macs": [macs[n] for n in names], "budget": budget, "float_val_acc": float_acc,
           "bits": [list(b) for b in res.best_bits], "cost": cost(res.best_bits), "val_acc": res.best_acc,
           "reward": res.best_reward, "episodes": a.releq_episodes, "agent_evaluations": agent_evals,
           "feasible": len(oracle), "oracle_rank": rank, "actions": sorted(a.releq_bits),
           "max_feasible_cost": max(cost(b) for b, _, _ in oracle),
           "oracle_top5": [{"bits": [list(x) for x in b], "reward": r, "val_acc": acc, "cost": cost(b)}
                           for b, r, acc in oracle[:5]],
           "qdarts_val_acc": None, "proxy": proxy.model_dump(mode="json"),
           "search_s": round(time.time() - ts, 1), "history": res.history}
    measured = {tuple(b): acc for b, _, acc in oracle}
    out["qdarts_val_acc"] = measured.get(qd)  # the QDARTS bits under the same measurement
    return out


def layer_bits(geno: list[Choice], bits: list[list[int]]) -> list[str]:
    """Per searched layer: its convolutions' ``W..A..`` joined by '+' ('-' for skip)."""
    out, i = [], 0
    for c in geno:
        k = len(OPS[c.op](1, 1, 1))
        out.append("+".join(f"W{w}A{b}" for w, b in bits[i:i + k]) or "-")
        i += k
    return out


def _std(t: torch.Tensor) -> float:
    return float(t.std()) if len(t) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--subset", type=int, default=10000, help="training images used in all")
    p.add_argument("--val", type=int, default=2000, help="selection-validation images (from --subset)")
    p.add_argument("--search-n", type=int, default=6000, help="images the search reads (half each split)")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--search-epochs", type=int, default=6)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=12, help="training epochs of each derived net")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--bops-ratio", type=float, default=160.0, help="target: float BOPs / this")
    p.add_argument("--bops-weight", type=float, default=1.0)
    p.add_argument("--arch-lr", type=float, default=3e-3, help="Adam learning rate of alpha and gamma")
    p.add_argument("--stem", default="qdarts_cifar10", help="name of the results files")
    p.add_argument("--seed", type=int, default=0, help="data split and search seed")
    p.add_argument("--seeds", type=int, nargs="+", help="retraining seeds (default: --seed only)")
    p.add_argument("--releq-episodes", type=int, default=200, help="ReLeQ arm's episodes (0: skip it)")
    p.add_argument("--releq-bits", type=int, nargs="+", default=[2, 3, 4], help="ReLeQ's W and A bits")
    p.add_argument("--releq-proxy-epochs", type=int, default=1, help="fine-tune epochs per ReLeQ measurement")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script end to end")
    p.add_argument("--runs-dir", default="runs/qdarts_cifar10")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.smoke:
        a.subset, a.val, a.search_n, a.search_epochs, a.warmup_epochs, a.epochs = 1200, 200, 512, 2, 1, 1
        a.releq_episodes = min(a.releq_episodes, 8)
        a.runs_dir, a.out = a.runs_dir + "_smoke", a.runs_dir + "_smoke"
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    runs = Path(a.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)

    data = load_dataset("cifar10", data_dir=a.data_dir, batch_size=64, test_batch_size=500, seed=a.seed)
    pool = data.train.subset(a.subset, seed=a.seed)
    sel_val, rest = pool.split(a.val, seed=a.seed)
    sel_val = sel_val.replace(augment=None, shuffle=False)
    s_train, s_val = rest.subset(a.search_n, seed=a.seed + 1).split(a.search_n // 2, seed=a.seed + 1)
    s_val = s_val.replace(augment=None)

    space = SearchSpace(channels=a.channels, layers=a.layers, reductions=(a.layers // 3, 2 * a.layers // 3))
    ref = [Choice("conv3x3", 32, 32)] * a.layers  # the float network (bits unused: float)
    float_bops = searched_bops(build_derived(space, ref, quantized=False), ref, (3, 32, 32))
    target = float_bops["searched"] / a.bops_ratio

    search_json = runs / "search.json"
    if search_json.exists():
        search = json.loads(search_json.read_text())
    else:
        torch.manual_seed(a.seed)
        net = SuperNet(space)
        cfg = QDARTSConfig(epochs=a.search_epochs, warmup_epochs=a.warmup_epochs, bops_weight=a.bops_weight,
                           bops_target=target, seed=a.seed, arch_lr=a.arch_lr)
        ts = time.time()
        res = qdarts_search(net, s_train, s_val, cfg, checkpoint=runs / "search.safetensors")
        search = {**res.to_json(), "config": asdict(cfg), "space": space.to_dict(),
                  "bops_range": list(net.bops_range()), "search_s": round(time.time() - ts, 1)}
        atomic_write_text(search_json, json.dumps(search, indent=1) + "\n")
    geno = [Choice(**c) for c in search["genotype"]]
    search["final_probs"] = final_probs(space, runs / "search.safetensors")
    atomic_write_text(runs / "recipe.json", json.dumps(derived_recipe(space, geno), indent=1) + "\n")

    variants = [("float conv3x3", ref, False), ("searched (QDARTS)", geno, True),
                ("searched ops, float", geno, False),
                ("searched ops, W4A4", [replace(c, w_bits=4, a_bits=4) for c in geno], True),
                ("searched ops, W2A2", [replace(c, w_bits=2, a_bits=2) for c in geno], True)]
    seeds = a.seeds or [a.seed]
    rows = []
    for name, g, quantized in variants:
        slug = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        runs_of = []
        for sd in seeds:  # seed a.seed keeps the plain run directory name (resumes older runs)
            torch.manual_seed(sd)
            model = build_derived(space, g, quantized=quantized)
            run_name = slug if sd == a.seed else f"{slug}_s{sd}"
            runs_of.append(train_net(run_name, model, rest, sel_val, data.test, a, runs, sd))
        bops = searched_bops(model, g, (3, 32, 32))
        tests = torch.tensor([r["test_acc"] for r in runs_of], dtype=torch.float64)
        vals = torch.tensor([r["val_acc"] for r in runs_of], dtype=torch.float64)
        rows.append({"name": name, "ops": [c.op for c in g], "seeds": seeds, "runs": runs_of,
                     "test_acc": float(tests.mean()), "test_std": _std(tests),
                     "val_acc": float(vals.mean()), "val_std": _std(vals),
                     "bits": "float" if not quantized else [f"W{c.w_bits}A{c.a_bits}" for c in g],
                     "bops_searched": bops["searched"], "bops_total": bops["total"],
                     "ratio_vs_float": float_bops["searched"] / max(1, bops["searched"])})
        print(f"{name:24s} BOPs {bops['searched']:.4g} ({rows[-1]['ratio_vs_float']:.0f}x fewer) "
              f"val {100 * rows[-1]['val_acc']:.2f}% test {100 * rows[-1]['test_acc']:.2f}% "
              f"± {100 * rows[-1]['test_std']:.2f} ({len(seeds)} seeds)", flush=True)

    if a.releq_episodes > 0:  # after the other rows: the float weights of "searched ops, float" exist
        releq = releq_search(space, geno, s_train, sel_val, float(rows[1]["bops_searched"]), a, runs)
        search["releq"] = {k: v for k, v in releq.items() if k != "history"}
        runs_of = []
        for sd in seeds:
            torch.manual_seed(sd)
            model = releq_net(space, geno, releq["bits"])
            runs_of.append(train_net("ReLeQ_equal_BOPs" if sd == a.seed else f"ReLeQ_equal_BOPs_s{sd}",
                                     model, rest, sel_val, data.test, a, runs, sd))
        bops = searched_bops(model, geno, (3, 32, 32))
        tests = torch.tensor([r["test_acc"] for r in runs_of], dtype=torch.float64)
        vals = torch.tensor([r["val_acc"] for r in runs_of], dtype=torch.float64)
        rows.append({"name": "ReLeQ bits, <= QDARTS BOPs", "ops": [c.op for c in geno], "seeds": seeds,
                     "runs": runs_of, "test_acc": float(tests.mean()), "test_std": _std(tests),
                     "val_acc": float(vals.mean()), "val_std": _std(vals),
                     "bits": layer_bits(geno, releq["bits"]),
                     "bops_searched": bops["searched"], "bops_total": bops["total"],
                     "ratio_vs_float": float_bops["searched"] / max(1, bops["searched"])})
        print(f"ReLeQ bits: BOPs {bops['searched']:.4g} (QDARTS {rows[1]['bops_searched']:.4g}) "
              f"test {100 * rows[-1]['test_acc']:.2f}% ± {100 * rows[-1]['test_std']:.2f}", flush=True)

    fp = rows[0]
    q = rows[1]
    delta = 100 * (q["test_acc"] - fp["test_acc"])
    ok_bops = q["ratio_vs_float"] >= 0.8 * PAPER["bops_ratio"]
    ok_acc = delta >= PAPER["acc_delta_pt"] - 1.0  # one point of slack for run-to-run noise
    verdict = ("reproduced" if ok_bops and ok_acc else "not reproduced") + (
        f": {q['ratio_vs_float']:.0f}x fewer BOPs (paper 160x) at {delta:+.2f} pt (paper -1.57 pt)")
    # the search (seed --seed; its data split also --seed + 1), the retraining runs, ReLeQ's proxy noise
    used = {a.seed, a.seed + 1, *seeds, *search.get("releq", {}).get("proxy_noise_seeds", [])}
    meta = run_meta(__file__, argv, t0, seeds=sorted(used), seed=a.seed, data="CIFAR-10 JPEG copy",
                    subset=a.subset, val=a.val, search_n=a.search_n, space=space.to_dict(),
                    target_bops=target, float_bops=float_bops)
    payload = {"meta": meta, "paper": PAPER, "search": search, "rows": rows, "verdict": verdict,
               "acc_delta_pt": delta, "vs_releq": vs_releq(rows)}
    plot(rows, Path(a.out) / f"{a.stem}.png")
    write_results(a.out, a.stem, payload, markdown(meta, search, rows, verdict, target, a))
    print(verdict)
    return 0


def interp(rows: list[dict[str, Any]]) -> float:
    """Test accuracy of uniform W2A2 -> W4A4 (rows 4, 3) interpolated, linear in log BOPs, at the
    searched net's BOPs (row 1); clamped to the segment."""
    lo, hi, q = rows[4], rows[3], rows[1]
    t = (math.log(q["bops_searched"]) - math.log(lo["bops_searched"])) / (
        math.log(hi["bops_searched"]) - math.log(lo["bops_searched"]))
    t = min(1.0, max(0.0, t))
    return lo["test_acc"] + t * (hi["test_acc"] - lo["test_acc"])


def vs_releq(rows: list[dict[str, Any]]) -> str | None:
    """QDARTS (row 1) vs ReLeQ's bits (row 5): the difference of mean test accuracy against twice
    its standard error over the retraining seeds."""
    if len(rows) < 6:
        return None
    q, r = rows[1], rows[5]
    diff = 100 * (q["test_acc"] - r["test_acc"])
    n = len(q["runs"])
    se = 100 * math.sqrt((q["test_std"] ** 2 + r["test_std"] ** 2) / max(1, n))
    if n < 2:
        word = "single run (no noise estimate)"
    elif abs(diff) <= 2 * se:
        word = "no significant difference"
    else:
        word = "QDARTS better" if diff > 0 else "ReLeQ better"
    return (f"{word}: QDARTS {100 * q['test_acc']:.2f} ± {100 * q['test_std']:.2f}% vs ReLeQ "
            f"{100 * r['test_acc']:.2f} ± {100 * r['test_std']:.2f}% ({diff:+.2f} pt, "
            f"2 SE = {2 * se:.2f} pt) "
            f"at {q['bops_searched']:,} vs {r['bops_searched']:,} BOPs")


def proxy_noise(rl: dict[str, Any]) -> str:
    """How far apart the proxy's measurements of the feasible set are, against its own noise."""
    out = ""
    if "oracle_all" in rl:
        accs = sorted(100 * t["val_acc"] for t in rl["oracle_all"])
        out += (f" Proxy accuracy over the {len(accs)} feasible assignments: min {accs[0]:.2f}%, median "
                f"{accs[len(accs) // 2]:.2f}%, max {accs[-1]:.2f}%.")
    if "proxy_noise" in rl:
        parts = []
        for label, xs in rl["proxy_noise"].items():
            t = torch.tensor(xs, dtype=torch.float64) * 100
            parts.append(f"{'the agent' if label == 'releq' else 'QDARTS'}'s bits "
                         f"{', '.join(f'{x:.2f}' for x in t.tolist())}% (std {_std(t):.2f} pt)")
        out += (" The proxy's own noise, the same assignment re-measured with the fine-tune's data order "
                f"(loader seeds {', '.join(map(str, rl.get('proxy_noise_seeds', [])))}): "
                + "; ".join(parts) + ".")
        if "oracle_all" in rl:
            noise = max(_std(torch.tensor(x, dtype=torch.float64) * 100) for x in rl["proxy_noise"].values())
            gap = accs[-1] - accs[len(accs) // 2]
            if noise >= 0.5 * gap:
                out += (f" That noise (std up to {noise:.1f} pt) is comparable to the gap between the best "
                        f"and the median feasible assignment ({gap:.1f} pt): which assignment the search "
                        "picks is decided by the data order of a 1-epoch fine-tune as much as by its bits.")
    return out


def room(rl: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What the budget leaves to choose: its margin over uniform W2A2 and the convs it pins to W2A2."""
    if "oracle_all" not in rl:
        return ""
    w2a2 = rows[4]["bops_searched"]
    low = min(rl["actions"])
    pinned = [i for i in range(len(rl["names"])) if all(t["bits"][i] == [low, low] for t in rl["oracle_all"])]
    share = sum(rl["macs"][i] for i in pinned) / sum(rl["macs"])
    margin = 100 * (rl["budget"] / w2a2 - 1)
    return (f" The budget leaves little to choose: it is {margin:.1f}% above uniform "
            f"W2A2 ({w2a2:,} BOPs), so every feasible assignment keeps "
            f"{', '.join(rl['names'][i] for i in pinned) or 'no convolution'} ({100 * share:.0f}% of the "
            f"searched MACs) at W{low}A{low} and differs only in the others.")


def releq_md(rl: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[str]:
    if rl is None or len(rows) < 6:
        return ["ReLeQ's assignment at equal BOPs was not run (--releq-episodes 0).", ""]
    r, q = rows[5], rows[1]
    top = "; ".join(f"{' '.join(f'W{w}A{b}' for w, b in t['bits'])} ({100 * t['val_acc']:.2f}%)"
                    for t in rl["oracle_top5"])
    qd = "" if rl["qdarts_val_acc"] is None else (
        f" The QDARTS bits under the same measurement: {100 * rl['qdarts_val_acc']:.2f}%.")
    pct = 100 * r["bops_searched"] / q["bops_searched"]
    same = "yes" if r["bops_searched"] == q["bops_searched"] else (
        f"no, {pct:.1f}% of it (the most any feasible assignment reaches)"
        if r["bops_searched"] == rl["max_feasible_cost"] else
        f"no, {pct:.1f}% of it (feasible assignments reach up to "
        f"{100 * rl['max_feasible_cost'] / q['bops_searched']:.1f}%: the agent chose a cheaper one)")
    return [
        "ReLeQ at equal BOPs: the PPO agent (`lowbit.search.releq`, the paper's PPO settings) picks each "
        f"searched convolution's (weight, activation) bits from {{{', '.join(map(str, rl['actions']))}}}"
        "² for the derived operations, under a hard budget of the QDARTS net's measured BOPs "
        f"({rl['budget']:,.0f}; infeasible actions masked, layers not chosen yet at W2A2, reward = "
        "accuracy term only). Measurement: a "
        f"{rl['proxy']['epochs']}-epoch fine-tune (Adam {rl['proxy']['lr']:g}) on the search's weight split "
        "from the float weights of 'searched ops, float' (seed 0), accuracy on the selection-validation "
        "images "
        f"(float {100 * rl['float_val_acc']:.2f}%). {rl['episodes']} episodes asked for "
        f"{rl['agent_evaluations']} distinct assignments of the {rl['feasible']} feasible ones; the oracle "
        f"over all {rl['feasible']} ranks the agent's pick {rl['oracle_rank'] + 1}; oracle top five "
        f"(val acc): {top}.{qd} The search took {rl['search_s']:.0f} s.{proxy_noise(rl)}",
        "",
        f"Equal BOPs achieved: {same} — ReLeQ net {r['bops_searched']:,} BOPs, QDARTS net "
        f"{q['bops_searched']:,} BOPs (both measured by `model_report` on the built nets).{room(rl, rows)}",
        "",
        f"**QDARTS vs ReLeQ at equal BOPs: {vs_releq(rows)}.**",
        "",
    ]


def cfg_bits(search: dict[str, Any], key: str) -> list[int]:
    return list(search["space"][key])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit._io import atomic_path

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    try:
        groups: list[list[dict[str, Any]]] = []  # rows within 0.15 decades of BOPs share a label stack
        for r in rows:
            ax.errorbar(r["bops_searched"], 100 * r["test_acc"], yerr=100 * r.get("test_std", 0.0), fmt="o",
                        capsize=3, zorder=3)
            near = [g for g in groups if abs(math.log10(g[0]["bops_searched"] / r["bops_searched"])) < 0.15]
            (near[0].append(r) if near else groups.append([r]))
        for g in groups:
            g.sort(key=lambda r: -r["test_acc"])
            for i, r in enumerate(g):  # stacked labels, each with a line to its point
                dy = 13 * ((len(g) - 1) / 2 - i) + (4 if len(g) == 1 else 0)
                ax.annotate(r["name"], (r["bops_searched"], 100 * r["test_acc"]), textcoords="offset points",
                            xytext=(14 if len(g) > 1 else 5, dy), fontsize=8, va="center",
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if len(g) > 1 else None)
        ax.set_xscale("log")
        ax.set_xlabel("bit-operations of the searched layers (log)")
        ax.set_ylabel("CIFAR-10 test accuracy (%)")
        ax.set_title("∇QDARTS on CIFAR-10 (CPU budget; bars: std over retraining seeds)")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def markdown(meta: dict[str, Any], search: dict[str, Any], rows: list[dict[str, Any]], verdict: str,
             target: float, a: argparse.Namespace) -> str:
    cfg = search["config"]
    lines = [
        "# ∇QDARTS on CIFAR-10: searched operations + bits vs float and uniform W4A4 / W2A2",
        "",
        f"Command: `OMP_NUM_THREADS=1 {meta['command']}` — torch {meta['torch']}, one thread, "
        f"wall time of the work (a busy shared machine): search {search.get('search_s', 0):.0f} s + "
        f"training {sum(x['train_s'] for r in rows for x in r['runs']):.0f} s (this invocation "
        f"{meta['wall_time_s']:.0f} s; finished runs are reused). "
        f"One search (seed {a.seed}); each net retrained with seeds {a.seeds or [a.seed]} "
        f"({'mean ± std' if a.seeds and len(a.seeds) > 1 else 'single run'}).",
        "",
        f"Data: CIFAR-10 JPEG copy; {a.subset} random training images: {a.val} for selection "
        f"(validation), the other {a.subset - a.val} to train every net; the search read {a.search_n} of "
        f"those ({a.search_n // 2} for the weights, {a.search_n // 2} as the architecture's validation "
        "split). Test set (10,000 images) read once per net at the end.",
        "",
        f"Net: float stem conv3x3 ({a.channels} ch), {a.layers} searchable layers (stride 2 and doubled "
        f"channels at layers {a.layers // 3} and {2 * a.layers // 3}), global pool, float classifier. "
        "Candidates per layer: conv3x3, conv5x5, sep3x3, dil3x3, skip (not at reductions); weight bits "
        "{2, 4} (uniform, per channel), activation bits {2, 4} (PACT).",
        "",
        f"Search: first-order DARTS, {cfg['epochs']} epochs ({cfg['warmup_epochs']} weight-only), "
        f"weights SGD {cfg['w_lr']} cosine, alpha/gamma Adam {cfg['arch_lr']}; "
        f"BOPs term lambda = {cfg['bops_weight']} x "
        f"max(0, E[BOPs]/target - 1), target {target:.4g} BOPs = float network / {a.bops_ratio:g}. "
        f"Final E[BOPs] of the relaxed net {search['expected_bops']:.4g}. Each net then trains from scratch "
        f"{a.epochs} epochs (SGD 0.9, lr {a.lr}, wd 5e-4, cosine, crop + flip, batch 64), best "
        "validation epoch kept.",
        "",
        "BOPs = MACs x weight bits x activation bits, counted by `lowbit report` (`model_report`); "
        "'searched' = the searchable layers only (the paper's convention: stem and classifier float and "
        "uncounted), 'total' adds the float stem and classifier at 32 x 32 bits.",
        "",
        "| net | ops | bits (W/A per layer) | BOPs searched | BOPs total | fewer BOPs than float | val acc | "
        "test acc (mean ± std) | test acc per seed |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        bits = r["bits"] if isinstance(r["bits"], str) else " ".join(r["bits"])
        lines.append(f"| {r['name']} | {' '.join(r['ops'])} | {bits} | {r['bops_searched']:,} | "
                     f"{r['bops_total']:,} | {r['ratio_vs_float']:.0f}x | {100 * r['val_acc']:.2f}% | "
                     f"{100 * r['test_acc']:.2f} ± {100 * r['test_std']:.2f}% | "
                     + ", ".join(f"{100 * x['test_acc']:.2f}" for x in r["runs"]) + " |")
    lines += [
        "",
        "| claim | paper | ours (mean over retraining seeds) |",
        "|---|---|---|",
        f"| BOPs vs FP32 | 160x fewer | {rows[1]['ratio_vs_float']:.0f}x fewer (vs the float conv3x3 net) |",
        f"| accuracy vs FP32 | -1.57 pt | {100 * (rows[1]['test_acc'] - rows[0]['test_acc']):+.2f} pt |",
        "",
        "The BOPs target (float network / "
        f"{a.bops_ratio:g}) is met by the relaxed net (E[BOPs] {search['expected_bops']:.4g} vs target "
        f"{target:.4g}); the argmax derivation lands at {rows[1]['bops_searched']:.4g} BOPs "
        f"({rows[1]['bops_searched'] / target:.2f} x the target). The question the run answers: what "
        "accuracy the search keeps, and whether its mix of operations and bits beats uniform W2A2 / W4A4 "
        f"of the same operations at equal BOPs. Uniform W2A2 -> W4A4 interpolated (linear in log BOPs) at "
        f"the searched net's BOPs: {100 * interp(rows):.2f}% vs the searched net's "
        f"{100 * rows[1]['test_acc']:.2f}%. Uniform quantization of the searched operations alone costs "
        f"{100 * (rows[4]['test_acc'] - rows[0]['test_acc']):+.2f} pt (W2A2) and "
        f"{100 * (rows[3]['test_acc'] - rows[0]['test_acc']):+.2f} pt (W4A4) against the float network; "
        f"the searched operations in float {100 * (rows[2]['test_acc'] - rows[0]['test_acc']):+.2f} pt.",
        "",
        "Quantizers: weights `uniform` per channel, symmetric with 2^(b-1) - 1 positive levels, so its "
        "2-bit weights are ternary (3 levels, counted as 2 bits); the paper's 2-bit weights have 4 levels. "
        "Activations `pact` (learned clip, 2^b levels).",
        "",
        f"**Verdict: {verdict}.** Scale differs from the paper (PC-DARTS cells, 600-epoch retraining on the "
        "full set, GPU): this is a CPU-budget check of the mechanism, not of the paper's absolute numbers.",
        "",
        *releq_md(search.get("releq"), rows),
        "Probabilities after the search, per layer: softmax(alpha) over the candidates, and for the "
        f"chosen operation P(weight bits {'/'.join(map(str, cfg_bits(search, 'w_bits')))}) and "
        f"P(activation bits {'/'.join(map(str, cfg_bits(search, 'a_bits')))}):",
        "",
    ]
    for l, (fp, c) in enumerate(zip(search["final_probs"], search["genotype"], strict=True)):
        o = fp["ops"].index(c["op"])
        ops = ", ".join(f"{n} {x:.2f}" for n, x in zip(fp["ops"], fp["p_op"], strict=True))
        if c["op"] == "skip":  # no convolution, no bits
            lines.append(f"- layer {l}: **skip** ({ops})")
            continue
        pw = ", ".join(f"{x:.2f}" for x in fp["p_w"][o])
        pa = ", ".join(f"{x:.2f}" for x in fp["p_a"][o])
        lines.append(f"- layer {l}: **{c['op']} W{c['w_bits']}A{c['a_bits']}** ({ops}; P(W) {pw}, P(A) {pa})")
    lines += ["", f"Plot: `{a.stem}.png` (test accuracy vs searched-layer BOPs)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
