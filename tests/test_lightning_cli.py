"""`latentlab-cli`: LightningCLI over the same LightningModules and DataModules as the Hydra app.

fit / validate / test through the CLI, `--print_config` round trips into `--config`, the data module's
sizes reach the model through `link_arguments`, and a CLI checkpoint is evaluated by `latentlab-eval` too.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from latentlab import api
from latentlab.cli import build_cli
from latentlab.models import ALMOND, AVB, VAE

Z = 4.0  # standard errors allowed between two estimates of the same NLL


def fast(root: Path) -> list[str]:
    return ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
            "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(root), "--seed_everything", "3"]


def only_checkpoint(root: Path) -> Path:
    (ckpt,) = root.rglob("*.ckpt")
    return ckpt


def test_fit_links_data_sizes_and_saves_a_config_latentlab_eval_reads(tmp_path: Path) -> None:
    cli = build_cli(["fit", "--model", "VAE", "--data", "DigitsDataModule", "--model.latent_dim", "3",
                     "--model.net.hidden_dims", "[32]", "--model.optimizer", "torch.optim.Adam",
                     "--model.optimizer.lr", "0.003", *fast(tmp_path)])
    model = cli.model
    assert isinstance(model, VAE) and model.data_dim == 64 and model.image_shape == (1, 8, 8)  # linked from data
    assert model.latent_dim == 3 and cli.trainer.test_loop.inference_mode is False  # AIS/Langevin need grads
    assert cli.trainer.global_step == 3 and math.isfinite(float(cli.trainer.callback_metrics["val/nll"]))
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.003)

    ckpt = torch.load(only_checkpoint(tmp_path), weights_only=True, map_location="cpu")
    saved = ckpt["latentlab"]["config"]
    assert saved["model"]["_target_"] == "latentlab.models.VAE" and "data_dim" not in saved["model"]
    assert saved["model"]["optimizer"] == {**saved["model"]["optimizer"], "_target_": "torch.optim.Adam",
                                           "_partial_": True, "lr": 0.003}
    assert saved["data"]["_target_"] == "latentlab.data.DigitsDataModule"


def test_print_config_round_trips_into_validate_and_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--model", "VAE", "--data", "DigitsDataModule", "--model.latent_dim", "2",
                   "--data.test_subset", "64", *fast(tmp_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "latentlab.models.VAE"
    assert config["model"]["init_args"]["latent_dim"] == 2 and "data_dim" not in config["model"]["init_args"]
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(config))

    fitted = build_cli(["fit", "--config", str(file)])
    ckpt = only_checkpoint(tmp_path)
    assert fitted.model.latent_dim == 2

    validated = build_cli(["validate", "--config", str(file), "--ckpt_path", str(ckpt)])
    assert math.isfinite(float(validated.trainer.callback_metrics["val/nll"]))
    tested = build_cli(["test", "--config", str(file), "--ckpt_path", str(ckpt)])
    for name, value in fitted.model.state_dict().items():  # test ran on the fitted weights
        assert torch.equal(value, tested.model.state_dict()[name]), name
    cli_metrics = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}

    # latentlab-eval rebuilds the model from the config the CLI saved, on the same test examples
    evaluated = api.evaluate(ckpt, ["logger=none", "+trainer.limit_test_batches=2"],
                             run_dir=tmp_path / "eval")
    se = math.hypot(cli_metrics["test/nll_se"], evaluated["test/nll_se"])
    assert abs(cli_metrics["test/nll"] - evaluated["test/nll"]) <= Z * se


@pytest.mark.parametrize("name, cls, extra", [
    ("AVB", AVB, ["--model.disc_steps", "2", "--model.disc_optimizer", "torch.optim.Adam",
                  "--model.disc_optimizer.lr", "0.0005"]),
    ("ALMOND", ALMOND, ["--model.n_chains", "3", "--model.eval_chains", "3",
                        "--model.eval_langevin_steps", "2"]),
])
def test_fit_every_method(tmp_path: Path, name: str, cls: type, extra: list[str]) -> None:
    cli = build_cli(["fit", "--model", name, "--data", "DigitsDataModule", *extra, *fast(tmp_path)])
    assert isinstance(cli.model, cls) and cli.model.data_dim == 64
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    if name == "AVB":
        assert cli.model.disc_steps == 2
        assert cli.trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.0005)
    else:
        assert cli.model.chains is not None and int(cli.model.visited.sum()) == 3 * 64  # 3 batches of 64


@pytest.mark.parametrize("name,precision,message", [
    ("VAE", "bf16-true", r"trainer.precision must be one of 32-true\|bf16-mixed\|16-mixed .*got 'bf16-true'"),
    ("VAE", "64-true", r"trainer.precision must be one of .*got '64-true'"),
    ("ALMOND", "16-mixed", r"trainer.precision=16-mixed does not work with almond: .*use bf16-mixed"),
])
def test_precisions_latentlab_train_refuses_are_refused_here_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch, name: str,
                                                                 precision: str, message: str) -> None:
    """Weights cast to bf16/float64 met float32 tensors mid-run (a crash at the first step or at train end), and
    ALMOND's gradients in z would bypass the float16 loss scaler: refused before any step, as one line and status 2
    from the console script. (On a CPU Lightning itself would quietly run 16-mixed as bf16-mixed.)"""
    import re
    import sys

    from latentlab.cli import main
    from latentlab.errors import ConfigError

    args = ["fit", "--model", name, "--data", "DigitsDataModule", "--trainer.precision", precision, *fast(tmp_path)]
    with pytest.raises(ConfigError, match=message):
        build_cli(args)
    monkeypatch.setattr(sys, "argv", ["latentlab-cli", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and re.search(message, err[-1]) and err[-1].startswith("latentlab: error: ")


@pytest.mark.parametrize("fill", [None, True])
def test_nan_fill_under_deterministic_follows_the_flag_as_in_latentlab_train(tmp_path: Path, fill: bool | None) -> None:
    """`--trainer.deterministic true` switches on torch's deterministic algorithms, whose default NaN-fills every new
    tensor (~4% of a step on two threads); the CLI turns the fill off unless `--fill_uninitialized_memory true`."""
    before = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = not fill
    flag = [] if fill is None else ["--fill_uninitialized_memory", "true"]
    try:
        build_cli(["--model", "VAE", "--data", "DigitsDataModule", "--trainer.deterministic", "true", *flag,
                   *fast(tmp_path)], run=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is bool(fill)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("given, expected", [([], "MethodProgressBar"),
                                              (["--trainer.callbacks", "lightning.pytorch.callbacks.TQDMProgressBar"],
                                               "TQDMProgressBar"),
                                              (["--trainer.enable_progress_bar", "false"], None)])
def test_progress_bar_is_latentlab_trains_unless_the_config_names_one(tmp_path: Path, given: list[str],
                                                                       expected: str | None) -> None:
    """Lightning's own Rich bar redraws up to 100 times a second; the CLI's default bar is latentlab-train's (10)."""
    args = fast(tmp_path)
    at = args.index("--trainer.enable_progress_bar")
    del args[at: at + 2]
    cli = build_cli(["--model", "VAE", "--data", "DigitsDataModule", *args, *given], run=False)
    bar = cli.trainer.progress_bar_callback
    assert (type(bar).__name__ if bar is not None else None) == expected
    if expected == "MethodProgressBar":
        assert bar.refresh_rate == 10 and sum(cb is bar for cb in cli.trainer.callbacks) == 1


@pytest.mark.parametrize("flush", [None, False])
def test_subnormals_are_flushed_while_fitting_unless_the_flag_says_false(tmp_path: Path, flush: bool | None) -> None:
    """As in latentlab-train: every CPU thread reads and writes subnormals as zero during `fit` (an operation on one
    costs ~100 cycles on an Intel CPU), and the caller's setting is back afterwards; `--flush_denormal false` keeps
    them."""
    import lightning.pytorch as L

    from latentlab.callbacks.torch_switches import flushing_denormals

    class Probe(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.flushing = flushing_denormals()

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    flag = [] if flush is None else ["--flush_denormal", "false"]
    cli = build_cli(["--model", "VAE", "--data", "DigitsDataModule", *flag, *fast(tmp_path)], run=False)
    probe = Probe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert probe.flushing is (flush is None)
    assert not flushing_denormals()
