"""A user's network from the command line and the config: ``--model package.module:factory``, option values typed
by the parameter they set, options that collide with the config, the output-size check, ``--batch-norm``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, SUMMARY, run, tiny_flags
from torch import nn

from maml_func.checkpoint import load_checkpoint, save_checkpoint
from maml_func.components import build_algorithm, build_network
from maml_func.config import TrainConfig, make_config
from maml_func.normalization import BATCH_NORM_POLICIES

TESTS = Path(__file__).resolve().parent
SMALL_CNN = "_user_models:small_cnn"


def maml_func_command(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m maml_func ARGV`` in a fresh process with ``tests/`` on PYTHONPATH (for ``_user_models``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "maml_func", *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


def pools(network: nn.Module) -> int:
    return sum(isinstance(m, nn.MaxPool2d) for m in network.modules())


# ------------------------------------------------------------ typed values
def test_option_values_take_the_type_of_their_parameter(tmp_path: Path) -> None:
    # Conv4's pool is a bool: "False" is False (it used to be a truthy string, building the pooled network).
    assert TrainConfig(model_options={"pool": "False"}).model_options == {"pool": False}
    assert pools(build_network(TrainConfig(model_options={"pool": "False"}))) == 0
    assert pools(build_network(TrainConfig(model_options={"pool": "YES"}))) == 4
    assert TrainConfig(model_options={"pool": 0}).model_options == {"pool": False}
    resnet = TrainConfig(model="resnet12", model_options={"widths": "4,4,8,8", "drop_rate": "0.1"})
    assert resnet.model_options == {"widths": [4, 4, 8, 8], "drop_rate": 0.1}
    listed = TrainConfig(model="resnet12", model_options={"widths": "[4, 4, 8, 8]"})
    assert listed.model_options["widths"] == [4, 4, 8, 8]
    mamlpp = TrainConfig(algorithm="mamlpp", algorithm_options={"multi_step_iterations": "none",
                                                                "first_order_iterations": "3"})
    assert mamlpp.algorithm_options == {"multi_step_iterations": None, "first_order_iterations": 3}
    assert TrainConfig(algorithm="imaml", algorithm_options={"lam": "1"}).algorithm_options == {"lam": 1.0}
    assert TrainConfig(algorithm="anil", algorithm_options={"loss": "mse"}).algorithm_options == {"loss": "mse"}
    # A parameter without type information (torchvision's **kwargs) takes a JSON-like literal.
    torchvision = TrainConfig(model="torchvision.models:resnet18", model_options={"num_classes": "5",
                                                                                    "progress": "false"})
    assert torchvision.model_options == {"num_classes": 5, "progress": False}
    # A config file goes through the same typing.
    toml = tmp_path / "run.toml"
    toml.write_text('[model_options]\npool = "False"\n')
    assert make_config(file=toml).model_options == {"pool": False}
    toml.write_text('[model_options]\npool = "maybe"\n')
    with pytest.raises(ValueError, match=r"model_options pool='maybe' is not valid: pool of Conv4 takes true or false"):
        make_config(file=toml)
    # Typing is idempotent: a checkpoint's config (already typed) reads back equal.
    again = TrainConfig.from_dict(resnet.to_dict())
    assert again.model_options == resnet.model_options and again.algorithm_options == resnet.algorithm_options


def test_pool_false_on_the_command_line_trains_the_unpooled_conv4(folder: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    code, _, err = run(["train", *tiny_flags(folder, tmp_path), "--model-option", "pool=False", "--iterations", "1",
                        "--val-every", "0", "--save-to", str(run_dir)], capsys)
    assert code == 0, err
    assert load_checkpoint(run_dir / "last.pt")["config"]["model_options"] == {"pool": False}


BAD_OPTIONS = {
    "not a bool": (["--model-option", "pool=notabool"],
                   "model_options pool='notabool' is not valid: pool of Conv4 takes true or false (also yes/no, 1/0)"),
    "hidden": (["--model-option", "hidden=32"], "model_options ['hidden'] are fields of the config; set them with "
                                                "--hidden instead"),
    "n_way": (["--model-option", "n_way=3"], "set them with --n-way instead"),
    "in_channels": (["--model-option", "in_channels=3"], "set them with --channels instead"),
    "image_size": (["--model-option", "image_size=32"], "set them with --image-size instead"),
    "unknown option": (["--model-option", "poool=true"], "'poool' is not a parameter of Conv4 (did you mean 'pool'?)"),
    "inner steps": (["--algorithm-option", "inner_steps=2"], "set them with --inner-steps instead"),
    "batch norm": (["--algorithm-option", "batch_norm=running"], "set them with --batch-norm instead"),
    "algorithm float": (["--algorithm", "imaml", "--algorithm-option", "lam=big"],
                        "algorithm_options lam='big' is not valid: lam of algorithm 'imaml' takes a number"),
    "algorithm int": (["--algorithm", "imaml", "--algorithm-option", "cg_steps=2.5"],
                      "cg_steps='2.5' is not valid: cg_steps of algorithm 'imaml' takes an integer (e.g. 5)"),
    "unknown module": (["--model", "nosuchpackage.nets:cnn"], "model 'nosuchpackage.nets:cnn': no module named "
                                                              "'nosuchpackage.nets' can be imported; the form is "
                                                              "package.module:factory"),
    "unknown attribute": (["--model", "torch.nn:NoSuchNet"], "'torch.nn' has no attribute 'NoSuchNet'; the form is "
                                                             "package.module:factory"),
    "not an import path": (["--model", "resnet18"], "model must be one of ['conv4', 'resnet12'], got 'resnet18'; or "
                                                    "your own network as an import path package.module:factory"),
    "factory option": (["--model", SMALL_CNN, "--model-option", "hidden=many"],
                       f"hidden='many' is not valid: hidden of {SMALL_CNN} takes an integer"),
    "factory unknown option": (["--model", SMALL_CNN, "--model-option", "depth=3"],
                               f"'depth' is not a parameter of {SMALL_CNN}; it takes n_way, in_channels, hidden"),
    "batch norm policy": (["--batch-norm", "moving"],
                          f"batch_norm must be {' or '.join(map(repr, BATCH_NORM_POLICIES))}, got 'moving'"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_exit_2_with_one_line_before_the_run_starts(case: str, folder: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    flags, message = BAD_OPTIONS[case]
    code, out, err = run(["train", *tiny_flags(folder, tmp_path), *flags, "--save-to", "run"], capsys)
    assert code == 2
    assert out == "" and err.count("\n") == 1 and err.startswith("maml-func train: error: TrainConfig: "), err
    assert message in err
    assert list(tmp_path.iterdir()) == []  # no run directory, no cache


def test_batch_norm_policy_reaches_the_algorithm_only_when_not_the_default(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    import maml_func.components

    seen: list[dict] = []
    monkeypatch.setattr(maml_func.components, "build",
                        lambda name, model, **options: seen.append(options) or SimpleNamespace(model=model))
    build_algorithm(TrainConfig())
    build_algorithm(TrainConfig(batch_norm="running"))
    assert "batch_norm" not in seen[0] and seen[1]["batch_norm"] == "running"
    assert make_config(batch_norm="running").batch_norm == "running"
    _, out, _ = run(["train", "--help"], capsys)
    out = " ".join(out.split())
    assert "--batch-norm POLICY" in out and "batch statistics at meta-train and meta-test, the MAML convention" in out


@pytest.mark.parametrize("policy", ["running", "per_step"])
def test_batch_norm_flag_trains_and_evaluates(policy: str, folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    algorithm = ["--algorithm", "mamlpp", "--inner-steps", "2"] if policy == "per_step" else []
    code, _, err = run(["train", *tiny_flags(folder, tmp_path), "--batch-norm", policy, *algorithm, "--iterations",
                        "2", "--val-every", "0", "--save-to", str(run_dir)], capsys)
    assert code == 0, err
    assert load_checkpoint(run_dir / "last.pt")["config"]["batch_norm"] == policy
    code, out, err = run(["eval", "--checkpoint", str(run_dir), "--tasks", "4", "--no-progress"], capsys)
    assert code == 0, err
    assert SUMMARY.match(out.splitlines()[0])


# ------------------------------------------------------- import-path models
@pytest.mark.slow
def test_import_path_model_trains_then_eval_and_resume_rebuild_it(folder: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    done = maml_func_command("train", *tiny_flags(folder, tmp_path), "--model", SMALL_CNN, "--model-option",
                             "n_way=3", "--model-option", "hidden=8", "--iterations", "2", "--val-every", "0",
                             "--save-to", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert f"model {SMALL_CNN}, run directory {run_dir}" in done.stderr.splitlines()[0]
    config = load_checkpoint(run_dir / "last.pt")["config"]
    assert (config["model"], config["model_options"]) == (SMALL_CNN, {"n_way": 3, "hidden": 8})

    done = maml_func_command("eval", "--checkpoint", str(run_dir), "--tasks", "4", "--no-progress")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert SUMMARY.match(lines[0]) and lines[0].startswith("3-way 1-shot:") and "(4 tasks, 3 steps)" in lines[0]

    # --resume rebuilds it too (here in this process, where tests/ is on sys.path).
    code, _, err = run(["train", "--resume", str(run_dir), "--iterations", "3"], capsys)
    assert code == 0, err
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 3

    # A checkpoint names the code that builds its network: one that names any other function is refused unrun.
    state = load_checkpoint(run_dir / "last.pt")
    state["config"].update(model="os:system", model_options={"command": f"touch {tmp_path / 'ran'}"})
    save_checkpoint(state, tmp_path / "crafted.pt")
    code, out, err = run(["eval", "--checkpoint", str(tmp_path / "crafted.pt")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "model 'os:system' is neither an nn.Module class nor a function annotated to return one" in err
    assert not (tmp_path / "ran").exists()


def test_output_size_that_is_not_n_way_is_refused_with_the_fix(folder: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["train", *tiny_flags(folder, tmp_path), "--model", SMALL_CNN, "--model-option", "n_way=5",
                        "--val-every", "0", "--save-to", str(tmp_path / "run")], capsys)
    assert code == 2
    error = err.splitlines()[-1]
    assert error == ("maml-func train: error: fit: the model gives 5 outputs per image but the tasks are 3-way; "
                     "build it with 3 outputs (e.g. --model-option num_classes=3 for a torchvision model), or set "
                     "n_way to 5")
    assert not (tmp_path / "run").exists()


def test_only_a_declared_network_factory_is_called(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model '_user_models:unannotated' is neither an nn.Module class nor a "
                                         r"function annotated to return one; annotate the factory \(def "
                                         r"unannotated\(...\) -> nn.Module\)"):
        TrainConfig(model="_user_models:unannotated")
    with pytest.raises(ValueError, match=r"the model factory call _user_models:not_a_network\(size=2\) returned a "
                                         r"list, not an nn.Module"):
        build_network(TrainConfig(model="_user_models:not_a_network", model_options={"size": "2"}))
    with pytest.raises(ValueError, match=r"small_cnn\(hidden=-1\) failed: RuntimeError: .*; fix the model options"):
        build_network(TrainConfig(model=SMALL_CNN, model_options={"hidden": -1}))


def rgb_tree(root: Path, classes: int = 5, per_class: int = 3, size: int = 32) -> Path:
    """An RGB ImageFolder tree split into train/, val/ and test/, ``classes`` classes each of random colours."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for part in ("train", "val", "test"):
        for c in range(classes):
            (root / part / f"class{c}").mkdir(parents=True)
            colour = torch.rand(3, 1, 1, generator=g)
            for i in range(per_class):
                pixels = (255 * (0.6 * colour + 0.4 * torch.rand(3, size, size, generator=g))).to(torch.uint8)
                image = Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")
                image.save(root / part / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_torchvision_resnet18_trains_and_evaluates_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree, run_dir = rgb_tree(tmp_path / "tree"), tmp_path / "run"
    done = maml_func_command(
        "train", "--model", "torchvision.models:resnet18", "--model-option", "num_classes=5", "--dataset", str(tree),
        "--data-root", str(tmp_path / "cache"), "--image-size", "32", "--channels", "3", "--n-way", "5", "--k-shot",
        "1", "--n-query", "1", "--meta-batch", "2", "--iterations", "2", "--val-every", "0", "--val-tasks", "2",
        "--first-order", "--save-to", str(run_dir), "--no-progress", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    config = load_checkpoint(run_dir / "last.pt")["config"]
    assert (config["model"], config["model_options"]) == ("torchvision.models:resnet18", {"num_classes": 5})

    # In this process (the training one above ran in its own): a second interpreter start costs seconds.
    code, out, err = run(["eval", "--checkpoint", str(run_dir), "--tasks", "2", "--batch-size", "2", "--steps", "1",
                          "--no-progress"], capsys)
    assert code == 0, err
    summary, per_step = out.splitlines()[:2]
    assert SUMMARY.match(summary) and summary.startswith("5-way 1-shot:") and "(2 tasks, 1 steps)" in summary
    assert re.match(r"accuracy after each inner step  0:\d+\.\d%  1:\d+\.\d%$", per_step)
