"""The ``lowbit`` command line: a thin layer over the Python API (no logic lives here)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

console = Console()

EPILOG = """\
examples:
  lowbit demo                     # MNIST: float LeNet-5, then binary weights / 4-bit activations
  lowbit recipes                                # the shipped recipes, one line each
  lowbit train --model lenet5 --data mnist --epochs 10 --optimizer adam --lr 1e-3 --out runs/fp
  lowbit train --model lenet5 --data mnist --recipe lenet5-w1a4 --init runs/fp/best.safetensors \\
               --epochs 10 --out runs/w1a4
  lowbit eval runs/w1a4                         # test accuracy of a run's best checkpoint
  lowbit train ... --resume                     # continue a killed run from its last checkpoint

Data: MNIST, Fashion-MNIST and scikit-learn digits are installed by the setup; CIFAR-10 (or its
JPEG zip), SVHN, ImageNet, image folders and the hyperspectral scenes are read from --data-dir or
$LOWBIT_DATA (standard file formats).
"""


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (no upper bound without ``hi``), so that a count such as
    --epochs 0 or --port 70000 is a usage error naming the option, before anything runs."""

    def parse(text: str) -> int:
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    """argparse type: a number > 0 (NaN is not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


COUNT = _int_in(1)  # epochs, batch sizes, images, repeats, threads...
COUNT0 = _int_in(0)  # where 0 means "none"


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training options (override the recipe's train section)")
    g.add_argument("--epochs", type=COUNT)
    g.add_argument("--lr", type=_positive, help="base learning rate")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    g.add_argument("--schedule", choices=["cosine", "step", "constant"])
    g.add_argument("--milestones", type=int, nargs="+", help="epochs where the step schedule decays")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-identical CPU runs (also across --resume)")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast (quantizers stay fp32)")
    g.add_argument("--channels-last", action="store_true", default=None, help="channels_last conv nets")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm across processes")


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")


def _train_overrides(a: argparse.Namespace) -> dict[str, Any]:
    keys = ["epochs", "lr", "optimizer", "schedule", "milestones", "weight_decay", "momentum", "seed",
            "deterministic", "precision", "channels_last", "compile", "sync_bn"]
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit",
        description="Train, compress and ship low-bit (binary, ternary, 2-8 bit) neural networks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--threads", type=COUNT, help="torch CPU threads (default: torch's choice; "
                   "1 is faster for small models on a busy machine)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the quick-start job: float then W1A4 LeNet-5 on MNIST, with a table")
    d.add_argument("--out", default="runs/demo", help="directory for both runs (default runs/demo)")
    d.add_argument("--fp-epochs", type=COUNT, default=10)
    d.add_argument("--q-epochs", type=COUNT, default=10)
    d.add_argument("--recipe", default="lenet5-w1a4", help="recipe of the quantized fine-tune")
    d.add_argument("--results", help="also write the results table here (PATH.json and PATH.md)")
    _device_flag(d)

    t = sub.add_parser("train", help="train a model (float, or quantized with --recipe)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", default="lenet5", help="zoo model name (see `lowbit models`)")
    t.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor argument, e.g. width_mult=2 (repeatable; JSON values)")
    t.add_argument("--data", default="mnist", help="dataset name (see `lowbit datasets`)")
    t.add_argument("--data-dir", help="where CIFAR-10/SVHN/ImageNet/hyperspectral files or an image "
                   "folder are (else $LOWBIT_DATA)")
    t.add_argument("--recipe", help="recipe YAML path or shipped recipe name; omit for float")
    t.add_argument("--init", help="checkpoint with float weights to start from (the usual path for QAT)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start again in a run directory that holds a run (its files are deleted)")
    t.add_argument("--batch-size", type=COUNT, default=128)
    t.add_argument("--subset", type=COUNT, help="train on this many samples only (quick runs)")
    t.add_argument("--val-size", default="auto", help="validation images carved from the training set "
                   "(picks the best epoch; default auto: the last 5,000 of MNIST/CIFAR-10); 0: none")
    _device_flag(t)
    t.add_argument("--nproc", type=COUNT, help="train with N processes on this machine (runs torchrun; "
                   "--batch-size is the global batch)")
    _train_flags(t)

    e = sub.add_parser("eval", help="test accuracy of a run directory or checkpoint")
    e.add_argument("run", help="run directory (uses best.safetensors) or a checkpoint inside one")
    e.add_argument("--data-dir")
    _device_flag(e)

    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("models", help="list the model zoo")
    sub.add_parser("datasets", help="list the datasets")

    r = sub.add_parser("report", help="per-layer bits, bytes, MACs and BOPs of a run or .lowbit file")
    r.add_argument("target", help="run directory or .lowbit file")
    r.add_argument("--json", help="also write the report as JSON here")
    r.add_argument("--png", help="also write a plot (bits and bytes per layer) here")

    x = sub.add_parser("export", help="export a run's model: packed .lowbit or ONNX")
    x.add_argument("run", help="run directory or checkpoint")
    x.add_argument("--format", choices=["lowbit", "onnx"], default="lowbit")
    x.add_argument("--out", required=True)
    x.add_argument("--data-dir")

    q = sub.add_parser("ptq", help="post-training multipoint quantization of a float run (no training)")
    q.add_argument("run", help="float run directory or checkpoint")
    q.add_argument("--bits", type=_int_in(2, 8), default=4, help="weight bits per point (2-8)")
    q.add_argument("--budget", type=float, default=1.0,
                   help="mean points per output channel (1 to --max-points)")
    q.add_argument("--max-points", type=_int_in(1, 8), default=2, help="most points one channel may get")
    q.add_argument("--calib", type=int, default=512, help="calibration images from the training set")
    q.add_argument("--out", required=True, help="packed .lowbit file to write")
    q.add_argument("--data-dir")
    _device_flag(q)

    se = sub.add_parser("search", help="mixed-precision search")
    ssub = se.add_subparsers(dest="search", metavar="METHOD")
    rl = ssub.add_parser("releq", help="ReLeQ: a PPO agent picks each layer's weight bits (from a float run)")
    rl.add_argument("run", help="float run directory or checkpoint")
    rl.add_argument("--out", required=True, help="directory for releq.json, the cache and recipe.yaml")
    rl.add_argument("--episodes", type=COUNT, default=300)
    rl.add_argument("--actions", type=int, nargs="+", default=[2, 3, 4, 5, 6],
                    help="bit-widths to choose from")
    rl.add_argument("--proxy", type=COUNT, default=2048, help="training images of each 1-epoch fine-tune")
    rl.add_argument("--act-actions", type=int, nargs="+",
                    help="also pick each layer's input bits from these (PACT); default: inputs stay float")
    rl.add_argument("--bops-budget", type=float,
                    help="hard limit on the searched layers' MACs x weight bits x input bits (32 if float)")
    rl.add_argument("--val", type=COUNT, default=2000, help="held-out training images the search reads")
    rl.add_argument("--reward-at-end", action="store_true",
                    help="measure each episode once, at its end, not after every layer (layers x cheaper)")
    rl.add_argument("--seed", type=int, default=0)
    _device_flag(rl)

    qd = ssub.add_parser("qdarts", help="∇QDARTS: search each layer's operation and W/A bits, then retrain")
    qd.add_argument("--data", default="cifar10", help="dataset name (square images)")
    qd.add_argument("--data-dir", help="where CIFAR-10 ... files are (else $LOWBIT_DATA)")
    qd.add_argument("--out", required=True, help="directory for qdarts.json, recipe.yaml and the retraining")
    qd.add_argument("--ops", nargs="+", default=["conv3x3", "conv5x5", "sep3x3", "dil3x3", "skip"])
    qd.add_argument("--w-bits", type=int, nargs="+", default=[2, 4], help="weight bit-widths to choose from")
    qd.add_argument("--a-bits", type=int, nargs="+", default=[2, 4], help="activation bit-widths")
    qd.add_argument("--channels", type=COUNT, default=8)
    qd.add_argument("--layers", type=COUNT, default=6)
    qd.add_argument("--epochs", type=COUNT, default=6, help="search epochs")
    qd.add_argument("--warmup-epochs", type=COUNT0, default=2, help="weight-only epochs first")
    qd.add_argument("--bops-weight", type=float, default=1.0, help="lambda of the BOPs term")
    qd.add_argument("--bops-ratio", type=_positive, help="BOPs target = float all-conv3x3 net / this")
    qd.add_argument("--subset", type=COUNT, help="training images used in all")
    qd.add_argument("--val", type=COUNT, default=2000, help="held-out training images for selection")
    qd.add_argument("--search-n", type=COUNT, help="training images the search reads (half for alpha/gamma)")
    qd.add_argument("--retrain-epochs", type=COUNT0, default=0, help="train the derived net from scratch")
    qd.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", metavar="BENCH")
    s = bsub.add_parser("speed", help="FP32 vs int8 vs lowbit runtime latency, side by side")
    s.add_argument("--out", default="benchmarks/results", help="directory for speed.md/speed.json")
    s.add_argument("--quick", action="store_true", help="fewer repeats and models")
    s.add_argument("--resume", action="store_true",
                   help="keep the cases a killed run finished (same settings and code)")
    bs = bsub.add_parser("serve", help="load-test lowbit serve on loopback: policies x traces")
    bs.add_argument("supernet", help="supernet file (lowbit.serve.save_supernet)")
    bs.add_argument("--policies", nargs="+",
                    default=["slackfit-queue", "slackfit", "max-accuracy", "fixed:all"],
                    help="slackfit, slackfit-queue, max-accuracy, fixed:<name>; fixed:all = every sub-net")
    bs.add_argument("--traces", nargs="+", default=["constant", "bursty", "ramp"])
    bs.add_argument("--rate", type=_positive, default=None,
                    help="mean requests per second (default: --load x the most accurate sub-net's capacity)")
    bs.add_argument("--load", type=_positive, default=1.2,
                    help="the rate as a multiple of the most accurate sub-net's profiled capacity")
    bs.add_argument("--duration", type=_positive, default=8.0, help="seconds per trace")
    bs.add_argument("--slo-ms", type=_positive, default=30.0)
    bs.add_argument("--max-batch", type=COUNT, default=32)
    bs.add_argument("--max-requests", type=COUNT, default=5000, help="cap on requests per trace")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--repeats", type=COUNT, default=2,
                    help="replay every trace with seeds seed, seed+1, ...")
    bs.add_argument("--out", default="benchmarks/results", help="directory for serve.{json,md,png}")
    bs.add_argument("--stem", default="serve")
    bs.add_argument("--samples", type=COUNT, default=32,
                    help="samples per request (at a few per request a Python client, not the server, "
                         "sets the rate on a small machine)")
    bs.add_argument("--max-in-flight", type=COUNT, default=64, help="client connections at most")
    bs.add_argument("--profile-repeats", type=COUNT, default=10, help="the servers' profiling repeats")
    bs.add_argument("--runtime", choices=("packed", "torch"), default="packed",
                    help="what the servers run their sub-nets on (lowbit serve --runtime)")
    bs.add_argument("--note", default="", help="what else ran on the machine, for the report")
    bs.add_argument("--resume", action="store_true",
                    help="keep the runs that a stopped load test with the same settings finished "
                    "(<out>/<stem>.partial.jsonl)")
    bs.add_argument("--overwrite", action="store_true",
                    help="start again although a stopped load test left runs (its partial file is deleted)")

    sv = sub.add_parser("serve", help="serve a supernet over HTTP, the sub-net picked per batch under an SLO")
    sv.add_argument("supernet", help="supernet file (lowbit.serve.save_supernet)")
    sv.add_argument("--slo-ms", type=_positive, default=30.0, help="latency target per request (ms)")
    sv.add_argument("--port", type=_int_in(1, 65535), default=8000)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--policy", default="slackfit",
                    help="slackfit | slackfit-queue | max-accuracy | fixed:<name>")
    sv.add_argument("--max-batch", type=COUNT, default=32)
    sv.add_argument("--max-queue", type=COUNT, default=1024, help="queued requests beyond this get 503")
    sv.add_argument("--threads", type=COUNT, default=1, help="inference threads")
    sv.add_argument("--profile-repeats", type=COUNT, default=10, help="timed runs per sub-net and batch size")
    sv.add_argument("--runtime", choices=("packed", "torch"), default="packed",
                    help="packed: each sub-net compiled by lowbit.runtime (PyTorch where it does not "
                    "compile, the reason logged); torch: each sub-net's stored model in PyTorch "
                    "(Supernet.run for a version-1 trainable file)")
    sv.add_argument("--profile", default=None, metavar="FILE",
                    help="take the sub-nets' latencies from this profile file (--save-profile) instead of "
                    "measuring them; refused unless it fits the supernet file, runtime, threads and max "
                    "batch")
    sv.add_argument("--save-profile", default=None, metavar="FILE",
                    help="write the latency profile the server plans with to FILE (JSON) before serving")

    sn = sub.add_parser("snn", help="spiking twins of CNNs (LIF neurons, learned leak and threshold)")
    snsub = sn.add_subparsers(dest="snn", metavar="ACTION")
    sc = snsub.add_parser("convert", help="a float run's spiking twin: convert, quantize, train through "
                          "time, measure accuracy, spike rates and energy")
    sc.add_argument("run", help="float run directory (a sequential CNN: lenet5, mlp, ...)")
    sc.add_argument("--out", required=True, help="directory for snn.json, snn.safetensors and checkpoints")
    sc.add_argument("--timesteps", type=COUNT, default=5, help="time steps T (default 5)")
    sc.add_argument("--recipe", default="snn-w6", help="weight quantization of the twin ('none': float)")
    sc.add_argument("--epochs", type=COUNT0, default=1, help="training epochs through time (0: convert only)")
    sc.add_argument("--lr", type=_positive, help="learning rate (default: the recipe's)")
    sc.add_argument("--percentile", type=float, default=99.9,
                    help="threshold = this percentile of the ReLU outputs")
    sc.add_argument("--threshold-scale", type=float, default=1.0,
                    help="times the percentile (lower: more spikes)")
    sc.add_argument("--val", type=int, default=5000, help="training images held out for validation")
    sc.add_argument("--subset", type=COUNT, help="train on this many images only")
    sc.add_argument("--energy", default="fp32_45nm", help="energy constants: fp32_45nm or int32_45nm")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    sc.add_argument("--overwrite", action="store_true",
                    help="start again in a directory that holds a run (its files are deleted)")
    return p


# ---------------------------------------------------------------------------- commands


def _parse_model_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--model-arg {it!r}: expected KEY=VALUE, e.g. width_mult=2")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _output_file(path: str, example: str, source: str | Path | None = None) -> None:
    """Refuse, before any work, an output file path that cannot be written (see
    :func:`lowbit._io.check_file_path`) or that is ``source`` or a file of the run ``source`` is or
    lies in (checkpoints, config, metrics, result): the command reads those, and would destroy them."""
    from ._io import check_file_path
    from .experiment import RUN_FILES

    out = check_file_path(path, example).resolve()
    if source is None:
        return
    src = Path(source)
    run_dir = src if src.is_dir() else src.parent
    if src.is_file() and src.resolve() == out:
        raise ValueError(f"{path} is the input file; writing the output there would replace it: give "
                         f"another path such as {run_dir / example}")
    if any((run_dir / f).resolve() == out for f in RUN_FILES if f != "model.lowbit"):
        raise ValueError(f"{path} is a file of the run {run_dir}; writing the output there would destroy "
                         f"the run: give another path such as {run_dir / example}")


def _output_dir(path: str, option: str = "--out") -> None:
    """Refuse, before any work, a directory path that is a file or lies inside one."""
    p = Path(path)
    blocker = next((d for d in (p, *p.parents) if d.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == p else f"lies inside {blocker}, which is a file"
        raise NotADirectoryError(f"{option} {path} {where}; give a directory (it is created if missing)")


def _supernet_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"supernet file {path} does not exist; give a file written by "
                                "lowbit.serve.save_supernet")
    if p.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a supernet file written by "
                                "lowbit.serve.save_supernet")


def _one_of_resume_overwrite(a: argparse.Namespace) -> None:
    if a.resume and a.overwrite:
        raise ValueError(f"--resume continues the run in {a.out} and --overwrite deletes it: give one of "
                         "them")


def cmd_train(a: argparse.Namespace) -> int:
    from .experiment import RUN_FILES, RunSpec, claim_run_dir, train_run
    from .progress import RichProgress
    from .train import distributed

    _one_of_resume_overwrite(a)
    _output_dir(a.out)
    run_files = [(Path(a.out) / f).resolve() for f in RUN_FILES]
    if a.overwrite and a.init and Path(a.init).resolve() in run_files:
        raise ValueError(f"--init {a.init} is a file of the run in {a.out}, which --overwrite deletes before "
                         "training: copy it elsewhere first, or choose another --out")
    spec = RunSpec(
        model=a.model,
        model_kwargs=_parse_model_args(a.model_arg),
        dataset=a.data,
        data_dir=a.data_dir,
        recipe=a.recipe,
        train=_train_overrides(a),
        init=a.init,
        out=a.out,
        batch_size=a.batch_size,
        train_subset=a.subset,
        val_size=int(a.val_size) if str(a.val_size).isdigit() else a.val_size,
        device=a.device,
    )
    spec.resolved_recipe()  # a bad recipe fails here, before --overwrite deletes the run it would replace
    if not a.resume and distributed.env_world_size() == 1:  # (once: the launcher, not each rank)
        claim_run_dir(a.out, a.overwrite)
    if a.nproc and a.nproc > 1 and distributed.env_world_size() == 1:
        return distributed.launch(a.nproc, distributed.without_nproc(a.argv))
    res = train_run(spec, resume=a.resume, progress=RichProgress(console=console))
    if not distributed.is_main():
        return 0
    chosen = (f"epoch {res.best_epoch}, chosen on validation accuracy {res.best_acc:.2%}"
              if res.best_acc is not None else f"{res.selected_on}, epoch {res.best_epoch}")
    console.print(f"[bold]test accuracy {res.test_acc:.2%}[/] ({chosen}) "
                  f"in {res.wall_time_s:.0f}s on {res.device} x{res.world_size} -> {res.run_dir}")
    if res.size:
        console.print(f"packed model: {res.size['file_bytes']:,} bytes, "
                      f"{res.size['compression_vs_fp32']:.1f}x smaller than FP32")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .experiment import load_run
    from .train import evaluate

    model, data, _ = load_run(a.run, a.device, data_dir=a.data_dir)
    ev = evaluate(model, data.test)
    console.print(f"{a.run}: test accuracy {ev['acc']:.2%} (loss {ev['loss']:.4f}, n={ev['n']})")
    return 0


def cmd_recipes(_: argparse.Namespace) -> int:
    from .recipe import Recipe, shipped_recipes

    t = Table("recipe", "description", title="shipped recipes (use with --recipe NAME)")
    for name, path in shipped_recipes().items():
        t.add_row(name, Recipe.from_yaml(path).description)
    console.print(t)
    return 0


def cmd_models(_: argparse.Namespace) -> int:
    from .models import MODELS

    t = Table("model", "description")
    for name, entry in MODELS.items():
        t.add_row(name, entry.description)
    console.print(t)
    return 0


def cmd_datasets(_: argparse.Namespace) -> int:
    from .data import list_datasets

    t = Table("dataset", "description")
    for name, desc in list_datasets().items():
        t.add_row(name, desc)
    console.print(t)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo
    from .progress import RichProgress

    _output_dir(a.out)
    rows = run_demo(a.out, fp_epochs=a.fp_epochs, q_epochs=a.q_epochs, recipe=a.recipe,
                    progress_factory=lambda: RichProgress(console=console),
                    say=console.print, device=a.device, results=a.results, command=["lowbit", *a.argv])
    t = Table("LeNet-5", "W bits", "A bits", "test acc", "bytes", "smaller",
              title="LeNet-5 on MNIST (10k test images)")
    for r in rows:
        t.add_row(r["name"], r["weight_bits"], r["act_bits"], f"{r['test_acc']:.2%}",
                  f"{r['bytes']:,}", f"{r['compression']:.1f}x")
    console.print(t)
    console.print(f"runs, metrics and packed model under {a.out}/; table and provenance in "
                  f"{a.out}/results.json")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .export import model_report, report_from_file

    target = Path(a.target)
    if a.json:
        _output_file(a.json, "report.json", target)
    if a.png:
        _output_file(a.png, "report.png", target)
    if target.is_file() and target.suffix not in (".safetensors", ".pt", ".pth"):  # packed, whatever its name
        rep = report_from_file(target)
    else:
        from .experiment import load_run, require_quantized_run

        model, data, _ = load_run(target)
        require_quantized_run(model, target, "nothing packed to report")
        rep = model_report(model, tuple(data.in_shape))
    console.print(rep.to_rich_table())
    if a.json:
        from ._io import atomic_write_text

        atomic_write_text(a.json, rep.to_json(), "report.json")
    if a.png:
        rep.plot(a.png)
        console.print(f"plot -> {a.png}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .experiment import load_run, require_quantized_run

    _output_file(a.out, f"model.{a.format}", a.run)
    model, data, _ = load_run(a.run, data_dir=a.data_dir)
    model.eval()
    if a.format == "lowbit":
        require_quantized_run(model, a.run)
        from .export import save_packed

        save_packed(model, a.out)
        console.print(f"packed model -> {a.out} ({Path(a.out).stat().st_size:,} bytes)")
    else:
        from .export import export_onnx

        table = export_onnx(model, a.out, tuple(data.in_shape))
        console.print(table.to_rich_table())
        console.print(f"ONNX model -> {a.out}")
    return 0


def cmd_ptq(a: argparse.Namespace) -> int:
    from .experiment import load_run
    from .export import save_packed
    from .nn.quantize import quantized_layers
    from .ptq import calibration_batches, multipoint_ptq
    from .train import evaluate

    if a.calib < 1:
        raise ValueError(f"--calib must be >= 1, got {a.calib}")
    if not 1 <= a.budget <= a.max_points:
        raise ValueError(f"--budget must be in [1, --max-points = {a.max_points}] (mean points per output "
                         f"channel), got {a.budget:g}")
    _output_file(a.out, "model.lowbit", a.run)
    model, data, _ = load_run(a.run, a.device, data_dir=a.data_dir)
    if quantized_layers(model):
        raise ValueError(f"{a.run} is a quantized run; lowbit ptq quantizes a float run")
    calib = calibration_batches(data.train, a.calib)
    used = sum(len(x) for x in calib)
    if used < a.calib:  # the training set ran out: go on with it all, but not silently
        logging.getLogger(__name__).warning("--calib %d: only %d training images; calibrating on %d",
                                            a.calib, used, used)
    rows = multipoint_ptq(model, calib, bits=a.bits, budget=a.budget, max_points=a.max_points)
    table = Table("layer", "channels", "points", "mean points", "rel. output error (1 point)",
                  "rel. output error")
    for r in rows:
        table.add_row(r.name, str(r.channels), str(r.points), f"{r.mean_points:.2f}",
                      f"{r.rel_output_error_1:.4f}", f"{r.rel_output_error:.4f}")
    console.print(table)
    ev = evaluate(model, data.test)
    size = save_packed(model.eval(), a.out)
    console.print(f"W{a.bits} multipoint (budget {a.budget:g}): test accuracy {ev['acc']:.2%}; "
                  f"packed model -> {a.out} ({size:,} bytes)")
    return 0


def _search_qdarts(a: argparse.Namespace) -> int:
    from .search.qdarts import QDARTSConfig, SearchSpace, qdarts_run

    _output_dir(a.out)
    space = SearchSpace(ops=tuple(a.ops), w_bits=tuple(a.w_bits), a_bits=tuple(a.a_bits), channels=a.channels,
                        layers=a.layers, reductions=(a.layers // 3, 2 * a.layers // 3))
    cfg = QDARTSConfig(epochs=a.epochs, warmup_epochs=a.warmup_epochs, bops_weight=a.bops_weight, seed=a.seed)
    res = qdarts_run(a.data, a.out, space, cfg, data_dir=a.data_dir, subset=a.subset, val=a.val,
                     search_n=a.search_n, bops_ratio=a.bops_ratio, retrain_epochs=a.retrain_epochs)
    t = Table("layer", "operation", "W bits", "A bits")
    for i, c in enumerate(res["genotype"]):
        t.add_row(str(i), c["op"], str(c["w_bits"]), str(c["a_bits"]))
    console.print(t)
    console.print(f"BOPs of the searched layers {res['bops']['searched']:,} "
                  f"({res['float_reference_bops'] / max(1, res['bops']['searched']):.0f}x fewer than the "
                  f"float all-conv3x3 net); whole net {res['bops']['total']:,}")
    if "retrain" in res:
        console.print(f"retrained {res['retrain']['epochs']} epochs: val {res['retrain']['val_acc']:.2%}, "
                      f"test {res['retrain']['test_acc']:.2%}")
    console.print(f"recipe -> {Path(a.out) / 'recipe.yaml'}; results -> {Path(a.out) / 'qdarts.json'}")
    return 0


def cmd_search(a: argparse.Namespace) -> int:
    if a.search == "qdarts":
        return _search_qdarts(a)
    if a.search != "releq":
        raise SystemExit("usage: lowbit search releq RUN --out DIR ... | lowbit search qdarts --out DIR ...")
    from .experiment import releq_run

    _output_dir(a.out)

    def show(i: int, h: dict[str, Any]) -> None:
        if (i + 1) % 10 == 0 or i + 1 == a.episodes:
            console.print(f"episode {i + 1}/{a.episodes}: bits {tuple(h['bits'])} reward {h['reward']:+.3f} "
                          f"val acc {h['acc']:.2%}")

    res = releq_run(a.run, a.out, episodes=a.episodes, actions=a.actions, proxy=a.proxy, val=a.val,
                    act_actions=a.act_actions, bops_budget=a.bops_budget, seed=a.seed, progress=show,
                    device=a.device, step_rewards=not a.reward_at_end)
    best = tuple(tuple(b) if isinstance(b, list) else b for b in res["best_bits"])
    console.print(f"best bits {best} "
                  f"for {res['layers']} ({res['best_bops']:,.0f} BOPs): "
                  f"reward {res['best_reward']:+.3f}, val acc {res['best_acc']:.2%} "
                  f"(float {res['float_val_acc']:.2%}); "
                  f"{res['evaluations']} assignments measured")
    console.print(f"recipe -> {Path(a.out) / 'recipe.yaml'}; fine-tune it with "
                  f"lowbit train --recipe {Path(a.out) / 'recipe.yaml'} --init <run>/best.safetensors ...")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    if a.bench == "serve":
        from .serve import load_supernet
        from .serve.bench import bench_serve_cli
        from .serve.policy import make_policy

        _supernet_file(a.supernet)
        _output_dir(a.out)
        names = load_supernet(a.supernet).names
        for policy in a.policies:  # a bad name fails here, not in a server started later
            if policy != "fixed:all":
                make_policy(policy, dict.fromkeys(names, 0.0), a.max_batch)
        console.print(bench_serve_cli(a))
        return 0
    if a.bench != "speed":
        raise SystemExit("usage: lowbit bench speed|serve ...")
    # the harness lives in the source checkout's benchmarks/speed/, not in the library; only this
    # package's own checkout is looked in, never the current directory (whose code would be run)
    import importlib.util

    package = Path(__file__).resolve().parent
    script = package.parents[1] / "benchmarks" / "speed" / "bench_speed.py"
    if package.parent.name != "src" or not script.is_file():
        raise SystemExit(f"lowbit bench speed needs a source checkout of lowbit (src/lowbit next to "
                         f"benchmarks/speed/bench_speed.py); this lowbit is installed at {package} without "
                         "one: clone the repository and pip install -e it, then run the command again")
    _output_dir(a.out)
    spec = importlib.util.spec_from_file_location("bench_speed", script)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    mod.run_speed_benchmark(out_dir=a.out, quick=a.quick, resume=a.resume)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve.app import serve

    _supernet_file(a.supernet)
    console.print(f"lowbit serve {a.supernet}: "
                  + (f"latencies from {a.profile}" if a.profile else "profiling sub-nets")
                  + f", then http://{a.host}:{a.port} (policy {a.policy}, SLO {a.slo_ms:g} ms)")
    return serve(a.supernet, slo_ms=a.slo_ms, port=a.port, policy=a.policy, host=a.host,
                 max_batch=a.max_batch, threads=a.threads, profile_repeats=a.profile_repeats,
                 max_queue=a.max_queue, runtime=a.runtime, profile_file=a.profile,
                 save_profile_file=a.save_profile)


def cmd_snn(a: argparse.Namespace) -> int:
    if a.snn != "convert":
        raise SystemExit("usage: lowbit snn convert RUN --out DIR [--timesteps T] [--recipe R] [--epochs E]")
    from .experiment import claim_run_dir
    from .progress import RichProgress
    from .snn.run import snn_run

    _one_of_resume_overwrite(a)
    _output_dir(a.out)
    source = Path(a.run) if Path(a.run).is_dir() else Path(a.run).parent
    if source.resolve() == Path(a.out).resolve():
        raise ValueError(f"--out {a.out} is the run being converted ({a.run}); give the spiking twin "
                         "another directory")
    if not a.resume:
        claim_run_dir(a.out, a.overwrite)
    res = snn_run(a.run, a.out, timesteps=a.timesteps, recipe=None if a.recipe == "none" else a.recipe,
                  epochs=a.epochs, lr=a.lr, percentile=a.percentile, threshold_scale=a.threshold_scale,
                  val=a.val, train_subset=a.subset, energy_model=a.energy, seed=a.seed, resume=a.resume,
                  progress=RichProgress(console=console) if a.epochs else None)
    e = res["energy"]
    t = Table("layer", "spike rate", "spikes / neuron", title=f"spiking twin, T = {a.timesteps}")
    for row in e["lif"]:
        t.add_row(row["layer"], f"{row['spike_rate']:.3f}", f"{row['spikes_per_neuron']:.2f}")
    console.print(t)
    val = f", val {res['val_acc']:.2%}" if "val_acc" in res else ""
    console.print(f"[bold]test accuracy {res['test_acc']:.2%}[/]{val}; energy {e['energy_ratio']:.2f}x "
                  f"below the CNN's ({e['energy_model']}; first layer every step: "
                  f"{e['energy_ratio_first_layer_xT']:.2f}x) -> {a.out}/snn.json")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "eval": cmd_eval,
    "recipes": cmd_recipes,
    "models": cmd_models,
    "datasets": cmd_datasets,
    "report": cmd_report,
    "export": cmd_export,
    "ptq": cmd_ptq,
    "search": cmd_search,
    "bench": cmd_bench,
    "snn": cmd_snn,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    a.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_time=False, show_path=False)])
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if not a.command:
        parser.print_help()
        return 0
    from .nn.quantize import SkippedQuantizationWarning, UnmatchedRuleWarning
    from .quant.base import NegativeInputWarning

    # lowbit logs these itself as it warns (for Python users who filter warnings); with warnings
    # captured into the log they would print twice
    for category in (SkippedQuantizationWarning, UnmatchedRuleWarning, NegativeInputWarning):
        warnings.filterwarnings("ignore", category=category)
    from .data import DatasetNotFoundError
    from .recipe import RecipeError
    from .train import CheckpointError, TrainingDiverged
    from .train.distributed import DistributedError

    try:
        return COMMANDS[a.command](a)
    except (RecipeError, DatasetNotFoundError, CheckpointError, TrainingDiverged, OSError,
            ValueError, DistributedError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")  # a path such as runs/[b] is text, not markup
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the last completed epoch's checkpoint is kept; "
                      "rerun with --resume to continue")
        return 130


def run() -> NoReturn:
    """The ``lowbit`` command: :func:`main`'s status as the exit code (a torchrun rank leaves its
    process group first, see :func:`lowbit.train.distributed.exit_process`)."""
    from .train.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
