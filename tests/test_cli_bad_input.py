"""Bad input to ``lowbit``: a usage error names the option and what it takes, an output path that
cannot be written or would replace an input is refused before any work, and nothing the command
reads (a run, its checkpoint, its config) is deleted or overwritten by a mistake.

Tiny jobs: an MLP on scikit-learn's 8x8 digits, one epoch; the runs are trained once per module.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from _cli_run import run_cli

from lowbit import cli

TINY = ["--model", "mlp", "--model-arg", "hidden=[16]", "--model-arg", "in_features=64", "--data", "digits",
        "--subset", "128", "--batch-size", "64", "--schedule", "constant", "--epochs", "1", "--seed", "0"]

pytestmark = pytest.mark.usefixtures("torch_formulas")  # the commands, not the fused kernels


_main = run_cli


def _digests(run: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(run.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    assert cli.main(["--threads", "1", "train", *TINY, "--out", str(root / "float")]) == 0
    assert cli.main(["--threads", "1", "train", *TINY, "--recipe", "lenet5-w1a4", "--out",
                     str(root / "quant")]) == 0
    return {"float": root / "float", "quant": root / "quant"}


@pytest.fixture
def run_copy(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the quantized run that a test may lose without harming the others."""
    return Path(shutil.copytree(runs["quant"], tmp_path / "run"))


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the command ran although its input was bad")


@pytest.fixture
def no_long_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The long parts of the commands fail at once: a bad input that is let through shows as a failed
    test, not as an hour of training."""
    import importlib.util

    import lowbit.demo
    import lowbit.experiment
    import lowbit.search.qdarts
    import lowbit.snn.run

    for module, name in ((lowbit.experiment, "train_run"), (lowbit.experiment, "releq_run"),
                         (lowbit.search.qdarts, "qdarts_run"), (lowbit.snn.run, "snn_run"),
                         (lowbit.demo, "run_demo"), (importlib.util, "spec_from_file_location")):
        monkeypatch.setattr(module, name, _must_not_run)


@pytest.fixture(scope="module")
def supernet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lowbit.models import build_model
    from lowbit.nn.supernet import Supernet
    from lowbit.serve import save_supernet

    torch.manual_seed(0)
    sn = Supernet(build_model("lenet5"), [{"name": "small", "width": 0.25, "bits": 2},
                                          {"name": "big", "width": 0.5, "bits": 4}], (1, 28, 28))
    sn.info = {"small": {"val_acc": 0.9, "test_acc": 0.9}, "big": {"val_acc": 0.95, "test_acc": 0.95}}
    path = tmp_path_factory.mktemp("supernet") / "tiny.supernet"
    save_supernet(sn.eval(), path)
    return path


# a) a number outside what an option takes is a usage error that names the option, before anything runs

USAGE = [
    (["--threads", "-1", "models"], "--threads", "an integer >= 1, got -1"),
    (["train", "--epochs", "0", "--out", "x"], "--epochs", "an integer >= 1, got 0"),
    (["train", "--batch-size", "0", "--out", "x"], "--batch-size", "an integer >= 1, got 0"),
    (["train", "--nproc", "0", "--out", "x"], "--nproc", "an integer >= 1, got 0"),
    (["train", "--lr", "-1", "--out", "x"], "--lr", "a number > 0, got -1"),
    (["demo", "--fp-epochs", "-1"], "--fp-epochs", "an integer >= 1, got -1"),
    (["ptq", "run", "--bits", "33", "--out", "m.lowbit"], "--bits", "an integer in [2, 8], got 33"),
    (["ptq", "run", "--max-points", "0", "--out", "m.lowbit"], "--max-points", "an integer in [1, 8], got 0"),
    (["search", "releq", "run", "--episodes", "0", "--out", "x"], "--episodes", "an integer >= 1, got 0"),
    (["search", "qdarts", "--bops-ratio", "0", "--out", "x"], "--bops-ratio", "a number > 0, got 0"),
    (["search", "qdarts", "--subset", "0", "--out", "x"], "--subset", "an integer >= 1, got 0"),
    (["search", "qdarts", "--search-n", "0", "--out", "x"], "--search-n", "an integer >= 1, got 0"),
    (["search", "qdarts", "--retrain-epochs", "-1", "--out", "x"], "--retrain-epochs",
     "an integer >= 0, got -1"),
    (["snn", "convert", "run", "--subset", "0", "--out", "x"], "--subset", "an integer >= 1, got 0"),
    (["serve", "f.supernet", "--slo-ms", "0"], "--slo-ms", "a number > 0, got 0"),
    (["serve", "f.supernet", "--slo-ms", "nan"], "--slo-ms", "a number > 0, got nan"),
    (["serve", "f.supernet", "--port", "70000"], "--port", "an integer in [1, 65535], got 70000"),
    (["serve", "f.supernet", "--threads", "0"], "--threads", "an integer >= 1, got 0"),
    (["serve", "f.supernet", "--profile-repeats", "0"], "--profile-repeats", "an integer >= 1, got 0"),
    (["serve", "f.supernet", "--max-queue", "0"], "--max-queue", "an integer >= 1, got 0"),
    (["bench", "serve", "f.supernet", "--repeats", "0"], "--repeats", "an integer >= 1, got 0"),
    (["bench", "serve", "f.supernet", "--max-in-flight", "0"], "--max-in-flight", "an integer >= 1, got 0"),
    (["bench", "serve", "f.supernet", "--samples", "0"], "--samples", "an integer >= 1, got 0"),
    (["bench", "serve", "f.supernet", "--duration", "0"], "--duration", "a number > 0, got 0"),
    (["train", "--epochs", "two", "--out", "x"], "--epochs", "an integer >= 1, got 'two'"),
]


@pytest.mark.parametrize("argv,option,expected", USAGE, ids=[" ".join(u[0][:3]) for u in USAGE])
def test_out_of_range_options_are_usage_errors(argv: list[str], option: str, expected: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for name in cli.COMMANDS:
        monkeypatch.setitem(cli.COMMANDS, name, _must_not_run)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert f"argument {option}: expected {expected}" in capsys.readouterr().err


def test_model_arg_without_a_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _main(capsys, "train", *TINY, "--model-arg", "hidden", "--out", str(tmp_path / "r"))
    assert rc == 2 and out == "error: --model-arg 'hidden': expected KEY=VALUE, e.g. width_mult=2"
    assert not (tmp_path / "r").exists()


def test_ptq_budget_beyond_the_points(runs: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "p.lowbit"
    rc, out = _main(capsys, "ptq", str(runs["float"]), "--budget", "3", "--out", str(out_file))
    assert rc == 2 and out == "error: --budget must be in [1, --max-points = 2] (mean points per output " \
                              "channel), got 3"
    assert not out_file.exists()


# b) an output path is checked before the work, and never replaces what the command reads


@pytest.mark.parametrize("args,name", [(["export"], "best.safetensors"), (["export"], "config.json"),
                                       (["report", "--json"], "config.json"),
                                       (["report", "--png"], "checkpoint.safetensors")])
def test_output_onto_the_runs_own_files_is_refused(run_copy: Path, args: list[str], name: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = _digests(run_copy)
    target = run_copy / name
    argv = [args[0], str(run_copy), "--out" if args[0] == "export" else args[1], str(target)]
    rc, out = _main(capsys, *argv)
    assert rc == 2 and f"error: {target} is a file of the run {run_copy}; writing the output there would " \
                       "destroy the run" in out
    assert _digests(run_copy) == before
    assert _main(capsys, "eval", str(run_copy))[0] == 0


def test_report_json_onto_the_packed_file_it_reads(run_copy: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    packed = run_copy / "model.lowbit"
    before = packed.read_bytes()
    rc, out = _main(capsys, "report", str(packed), "--json", str(packed))
    assert rc == 2 and out.startswith(f"error: {packed} is the input file;"), out
    assert packed.read_bytes() == before


def test_export_may_rewrite_the_runs_packed_model(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (run_copy / "model.lowbit").read_bytes()
    rc, _ = _main(capsys, "export", str(run_copy), "--out", str(run_copy / "model.lowbit"))
    assert rc == 0 and (run_copy / "model.lowbit").read_bytes() == before  # the same model, packed again


def test_ptq_output_path_is_checked_before_loading(runs: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import lowbit.experiment

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run was loaded before the output path was checked")

    monkeypatch.setattr(lowbit.experiment, "load_run", must_not_load)
    rc, out = _main(capsys, "ptq", str(runs["float"]), "--out", str(tmp_path))
    assert rc == 2 and out == f"error: {tmp_path} is a directory; give a file path such as " \
                              f"{tmp_path / 'model.lowbit'}"


def test_report_png_into_a_directory_suggests_a_png(runs: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _main(capsys, "report", str(runs["quant"]), "--png", str(tmp_path))
    assert rc == 2 and out == f"error: {tmp_path} is a directory; give a file path such as " \
                              f"{tmp_path / 'report.png'}"


def test_report_reads_a_packed_file_under_any_name(runs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    renamed = Path(shutil.copy(runs["quant"] / "model.lowbit", tmp_path / "model.json"))
    rc, out = _main(capsys, "report", str(renamed))
    assert rc == 0 and "vs FP32" in out  # the packed file's report, not "has no config.json"


@pytest.mark.parametrize("argv", [["train", *TINY], ["search", "releq", "RUN"], ["search", "qdarts"],
                                  ["snn", "convert", "RUN"], ["bench", "speed", "--quick"], ["demo"]],
                         ids=lambda a: " ".join(a[:2]))
def test_out_directory_that_is_a_file(argv: list[str], runs: dict[str, Path], tmp_path: Path,
                                      no_long_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    argv = [str(runs["float"]) if x == "RUN" else x for x in argv]
    rc, out = _main(capsys, *argv, "--out", str(a_file))
    assert rc == 2 and out == f"error: --out {a_file} is a file; give a directory (it is created if missing)"
    rc, out = _main(capsys, *argv, "--out", str(a_file / "sub"))
    assert rc == 2 and f"lies inside {a_file}, which is a file" in out
    assert a_file.read_text() == "keep me"


# c) no run is lost to --overwrite or --resume


def test_snn_convert_into_the_run_it_converts(runs: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(runs["float"], tmp_path / "float"))
    before = _digests(run)
    rc, out = _main(capsys, "snn", "convert", str(run), "--out", str(run), "--overwrite")
    assert rc == 2 and out == f"error: --out {run} is the run being converted ({run}); give the spiking " \
                              "twin another directory"
    assert _digests(run) == before


def test_train_overwrite_of_the_run_holding_init(runs: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(runs["float"], tmp_path / "float"))
    before = _digests(run)
    init = run / "best.safetensors"
    rc, out = _main(capsys, "train", *TINY, "--recipe", "lenet5-w1a4", "--init", str(init), "--out", str(run),
                    "--overwrite")
    assert rc == 2 and out.startswith(f"error: --init {init} is a file of the run in {run}, which "
                                      "--overwrite deletes before training"), out
    assert _digests(run) == before


@pytest.mark.parametrize("cmd", [["train", *TINY], ["snn", "convert", "RUN"]], ids=["train", "snn"])
def test_resume_and_overwrite_together(cmd: list[str], run_copy: Path, runs: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = _digests(run_copy)
    argv = [str(runs["float"]) if x == "RUN" else x for x in cmd]
    rc, out = _main(capsys, *argv, "--out", str(run_copy), "--resume", "--overwrite")
    assert rc == 2 and out == f"error: --resume continues the run in {run_copy} and --overwrite deletes " \
                              "it: give one of them"
    assert _digests(run_copy) == before


# d) --data-dir is used by the commands that load a run


def test_data_dir_replaces_the_one_the_run_was_trained_with(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                image.fromarray(pixels).save(tmp_path / "imgs" / split / c / f"{i}.png")
    run = tmp_path / "run"
    assert _main(capsys, "train", "--model", "mlp", "--model-arg", "in_features=192", "--model-arg",
                 "hidden=[8]", "--model-arg", "num_classes=2", "--data", "imagefolder", "--data-dir",
                 str(tmp_path / "imgs"), "--epochs", "1", "--batch-size", "8", "--val-size", "8",
                 "--out", str(run))[0] == 0
    moved = Path(shutil.move(tmp_path / "imgs", tmp_path / "moved"))
    rc, out = _main(capsys, "eval", str(run))
    assert rc == 2 and "dataset 'imagefolder' not found" in out  # the data are no longer where they were
    rc, out = _main(capsys, "eval", str(run), "--data-dir", str(moved))
    assert rc == 0 and "test accuracy" in out and "n=8" in out
    pytest.importorskip("onnx")
    rc, _ = _main(capsys, "export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                  "--data-dir", str(moved))
    assert rc == 0 and (tmp_path / "m.onnx").is_file()


# e) the demo and the serving commands check their inputs before the long part


def test_demo_checks_recipe_and_results_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import lowbit.demo

    def must_not_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before the inputs were checked")

    monkeypatch.setattr(lowbit.demo, "train_run", must_not_train)
    rc, out = _main(capsys, "demo", "--out", str(tmp_path / "d"), "--recipe", "nosuch")
    assert rc == 2 and out.startswith("error: no recipe file or shipped recipe called 'nosuch'"), out
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    rc, out = _main(capsys, "demo", "--out", str(tmp_path / "d"), "--results", str(a_file / "r"))
    assert rc == 2 and out == f"error: {a_file} is a file, not a folder: {a_file / 'r.json'} cannot be " \
                              "written inside it"
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("cmd", [["serve"], ["bench", "serve"]], ids=["serve", "bench serve"])
def test_supernet_path_that_is_missing_or_a_directory(cmd: list[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # bench serve's default --out is relative
    rc, out = _main(capsys, *cmd, str(tmp_path / "nope.supernet"))
    assert rc == 2 and out.endswith(f"error: supernet file {tmp_path / 'nope.supernet'} does not exist; give "
                                    "a file written by lowbit.serve.save_supernet"), out
    rc, out = _main(capsys, *cmd, str(tmp_path))
    assert rc == 2 and out.endswith(f"error: {tmp_path} is a directory; give a supernet file written by "
                                    "lowbit.serve.save_supernet"), out


def test_bench_serve_refuses_an_unknown_policy_before_any_server(supernet_file: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("httpx")
    import lowbit.serve.bench

    monkeypatch.setattr(lowbit.serve.bench, "run_serve_bench", _must_not_run)
    for policy, words in (("nosuch", "unknown policy 'nosuch'; allowed: slackfit"),
                          ("fixed:huge", "policy 'fixed:huge': no sub-net 'huge'; sub-nets: small, big")):
        rc, out = _main(capsys, "bench", "serve", str(supernet_file), "--policies", "slackfit", policy,
                        "--out", str(tmp_path))
        assert rc == 2 and f"error: {words}" in out, out
    assert list(tmp_path.iterdir()) == []
