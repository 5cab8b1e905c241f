"""Bad input is refused before training with a message that names the key (or file) and what is allowed:
a table of bad configs and command lines, a table of bad data files and checkpoints, and a few runs of
the real CLI asserting `latentlab: error: ...` on stderr, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import latentlab
from latentlab.builders import compose_config
from latentlab.checkpointing import load_checkpoint_safely
from latentlab.errors import CheckpointError, ConfigError, DataError, LatentlabError
from latentlab.train import preflight, train

QUIET = ["logger=none", "callbacks.progress_bar=null", "callbacks.model_summary=null", "callbacks.image_grid=null",
         "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
TINY = ["trainer.max_epochs=1", "eval.nll.k=5", "eval.val_nll.k=5", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1"]


def refused(out: Path, *overrides: str) -> LatentlabError:
    """Run the command-line checks and then `train` as `latentlab-train` would; return the error it must raise,
    after checking that nothing that looks like a run's result was written."""
    with pytest.raises(LatentlabError) as info:
        preflight(list(overrides))
        train(compose_config([*QUIET, *TINY, *overrides], output_dir=out))
    assert not (out / "metrics.json").exists() and not (out / "checkpoints").exists()
    return info.value


# (overrides, error class, regex the message must match: the key, and the allowed values where there is a set)
BAD_CONFIGS: list[tuple[list[str], type[LatentlabError], str]] = [
    (["model.latent_dim=[1,2"], ConfigError, r"malformed command-line override 'model.latent_dim=\[1,2'.*key=value"),
    (["trainer.max_epochs"], ConfigError, r"malformed command-line override 'trainer.max_epochs'"),
    (["ckpt_path=runs/a/checkpoints/epoch=3.ckpt"], ConfigError, r"quote values .*here: \"ckpt_path='runs/a/checkpoints/epoch=3.ckpt'\""),
    (["model=nosuchmodel"], ConfigError, r"model/nosuchmodel.*Available options in 'model'.*vae"),
    (["model.latnet_dim=3"], ConfigError, r"Could not override 'model.latnet_dim'"),
    (["+model.latnet_dim=3"], ConfigError, r"model.latnet_dim is not a parameter of latentlab.models.VAE; allowed: .*latent_dim"),
    (["+sed=3"], ConfigError, r"unknown top-level config key\(s\) sed; known: .*seed"),
    (["model.latent_dim=abc"], ConfigError, r"model.latent_dim must be an integer, got 'abc'"),
    (["model.latent_dim=0"], ConfigError, r"model.latent_dim must be a positive integer, got 0"),
    (["model.beta=-1"], ConfigError, r"model.beta .* must be >= 0"),
    (["model.optimizer.lr=-0.1"], ConfigError, r"model.optimizer.lr must be > 0"),
    (["model.optimizer.lr=fast"], ConfigError, r"model.optimizer.lr must be a number"),
    (["+model.optimizer.betaz=3"], ConfigError, r"model.optimizer.betaz is not a parameter of torch.optim.Adam; allowed: .*betas"),
    (["model.optimizer._target_=torch.optim.Adamm"], ConfigError, r"model.optimizer._target_='torch.optim.Adamm' cannot be imported"),
    (["model.likelihood.kind=poisson"], ConfigError, r"model.likelihood.kind must be 'bernoulli' or 'gaussian'"),
    (["model.likelihood.variance=big"], ConfigError, r"model.likelihood.variance must be a number"),
    (["+eval.nll.kk=3"], ConfigError, r"eval.nll.kk is not a setting of NLLSettings; allowed: .*\bk\b"),
    (["eval.nll.estimator=exact"], ConfigError, r"eval.nll.estimator must be one of auto\|is\|ais"),
    (["net.hidden_dims=[a,b]"], ConfigError, r"net.hidden_dims\[0\] must be an integer, got 'a'"),
    (["net.kind=transformer"], ConfigError, r"net.kind must be one of"),
    (["data.batch_size=0"], ConfigError, r"data.batch_size must be an integer >= 1, got 0"),
    (["data.binarize=maybe"], ConfigError, r"data.binarize must be one of .*'dynamic'"),
    (["data.val_size=1.5"], ConfigError, r"data.val_size"),
    (["seed=-1"], ConfigError, r"seed must be an integer in \[0, 4294967295\] or null"),
    (["seed=abc"], ConfigError, r"seed must be an integer or null, got 'abc'"),
    (["train=maybe"], ConfigError, r"train must be true or false"),
    (["trainer.max_epochs=-5"], ConfigError, r"trainer.max_epochs must be an integer >= -1, got -5"),
    (["trainer.precision=fp33"], ConfigError, r"trainer.precision must be one of .*32-true.*got 'fp33'"),
    (["trainer.precision=bf16-true"], ConfigError, r"trainer.precision must be one of 32-true\|bf16-mixed\|16-mixed \(float32 weights.*got 'bf16-true'"),
    (["trainer.precision=64-true"], ConfigError, r"trainer.precision must be one of 32-true\|bf16-mixed\|16-mixed .*got '64-true'"),
    (["model=almond", "trainer.precision=16-mixed"], ConfigError, r"trainer.precision=16-mixed does not work with almond: .*use bf16-mixed"),
    (["trainer.accelerator=tpu9"], ConfigError, r"trainer.accelerator must be one of cpu\|gpu\|cuda\|mps\|tpu\|auto"),
    (["trainer.devices=0"], ConfigError, r"trainer.devices must be a number of devices"),
    (["++trainer.limit_train_batches=1.5"], ConfigError, r"trainer.limit_train_batches must be an integer count >= 0 or a fraction in \[0.0, 1.0\]"),
    (["trainer.log_every_n_steps=0"], ConfigError, r"trainer.log_every_n_steps must be an integer >= 1"),
    (["+trainer.max_epoch=3"], ConfigError, r"trainer.max_epoch is not a parameter of lightning.pytorch.Trainer; allowed: .*max_epochs"),
    (["callbacks.model_checkpoint.every_n_epochs=-1"], ConfigError, r"callbacks.model_checkpoint.every_n_epochs must be an integer >= 0"),
    (["callbacks.model_checkpoint.every_n_train_steps=often"], ConfigError, r"callbacks.model_checkpoint.every_n_train_steps must be an integer"),
    (["callbacks.numerics.gradient_clip_val=-1"], ConfigError, r"callbacks.numerics.gradient_clip_val must be > 0 or null"),
    (["callbacks.numerics.gradient_clip_algorithm=max"], ConfigError, r"gradient_clip_algorithm must be one of norm\|value"),
    (["ckpt_path=last"], CheckpointError, r"ckpt_path=last: there is no checkpoint .*hydra.run.dir=<its run directory>"),
    (["ckpt_path=/nonexistent/last.ckpt"], CheckpointError, r"ckpt_path=/nonexistent/last.ckpt: no such checkpoint file"),
    (["ckpt_weights_only=sometimes"], ConfigError, r"ckpt_weights_only must be true or false"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_CONFIGS, ids=[" ".join(c[0]) for c in BAD_CONFIGS])
def test_bad_config_is_refused_before_training(tmp_path: Path, overrides: list[str], error: type, message: str) -> None:
    exc = refused(tmp_path / "run", *overrides)
    assert isinstance(exc, error) and re.search(message, str(exc), re.DOTALL), str(exc)


def test_gradient_clip_in_the_trainer_with_a_manual_optimisation_method_points_to_the_switch(tmp_path: Path) -> None:
    from latentlab.config_schema import check_model_against_trainer

    class Manual:
        method, automatic_optimization = "almond", False

    cfg = compose_config(["+trainer.gradient_clip_val=1.0"])
    with pytest.raises(ConfigError, match="callbacks.numerics.gradient_clip_val"):
        check_model_against_trainer(cfg, Manual())
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=2 does not work with almond .* data.batch_size"):
        check_model_against_trainer(compose_config(["+trainer.accumulate_grad_batches=2"]), Manual())
    check_model_against_trainer(compose_config(["+trainer.accumulate_grad_batches=1"]), Manual())


# ----- bad files ----------------------------------------------------------------------------------
def mnist_copy(root: Path, shared: Path, damage: str) -> Path:
    """data dir with mnist/ linked to the shared files, one of them damaged as `damage` says."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    target = "t10k-images-idx3-ubyte.gz"
    for f in (shared / "mnist").iterdir():
        if f.name != target:
            (folder / f.name).symlink_to(f)
    data = (shared / "mnist" / target).read_bytes()
    if damage == "truncated":
        (folder / target).write_bytes(data[:-1000])
    elif damage == "corrupted":  # same size, one byte changed: only the md5 can tell
        (folder / target).write_bytes(data[:500] + bytes([data[500] ^ 0xFF]) + data[501:])
    return root


@pytest.mark.parametrize("damage,message", [
    ("missing", r"t10k-images-idx3-ubyte.gz.*(missing|not found|does not exist)"),
    ("truncated", r"t10k-images-idx3-ubyte.gz has 1647877 bytes, expected 1648877"),
    ("corrupted", r"t10k-images-idx3-ubyte.gz has md5 \w+, expected 9fb629c4189551a2d022fa330f9573f3"),
])
def test_bad_data_file_is_refused_with_the_fix(tmp_path: Path, shared_data_dir: Path, damage: str, message: str) -> None:
    root = mnist_copy(tmp_path / "data", shared_data_dir, damage)
    exc = refused(tmp_path / "run", "data=mnist", f"paths.data_dir={root}", "data.train_subset=100", "data.test_subset=100")
    assert isinstance(exc, DataError) and re.search(message, str(exc)), str(exc)
    assert re.search(r"download=true|copy|data_dir", str(exc)), str(exc)  # the fix is spelled out


def test_missing_data_directory_names_it(tmp_path: Path) -> None:
    exc = refused(tmp_path / "run", "data=mnist", "paths.data_dir=/nonexistent/latentlab-data")
    assert isinstance(exc, DataError) and "/nonexistent/latentlab-data" in str(exc)


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good")
    train(compose_config([*QUIET, *TINY], output_dir=out))
    return out / "checkpoints" / "last.ckpt"


def _edited(good: Path, dest: Path, edit: str) -> Path:
    if edit == "truncated":
        dest.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif edit == "garbage":
        dest.write_bytes(os.urandom(4096))
    elif edit == "foreign":
        torch.save({"state_dict": {"w": torch.ones(2)}}, dest)
    else:
        ckpt = torch.load(good, weights_only=True)
        if edit == "other-version":
            ckpt["latentlab"]["version"] = "9.1.0"
        elif edit == "other-method":
            ckpt["latentlab"]["method"] = "almond"
        elif edit == "non-finite":
            next(iter(ckpt["state_dict"].values())).view(-1)[0] = float("nan")
        torch.save(ckpt, dest)
    return dest


@pytest.mark.parametrize("edit,overrides,message", [
    ("truncated", [], r"cannot read checkpoint .*not a complete PyTorch checkpoint file \(truncated or corrupted"),
    ("garbage", [], r"cannot read checkpoint .*not a complete PyTorch checkpoint file"),
    ("foreign", [], r"is not a latentlab checkpoint .*not written by latentlab-train"),
    ("other-version", [], rf"written by latentlab 9.1.0, but this is latentlab {re.escape(latentlab.__version__)}"),
    ("other-method", [], r"is a checkpoint of method 'almond', but the config builds 'vae'; pass model=almond"),
    ("as-is", ["model.latent_dim=4"], r"does not fit the model this config builds .*shape \(checkpoint vs config\)"),
    ("non-finite", [], r"holds non-finite values"),
])
def test_bad_checkpoint_to_resume_is_refused(tmp_path: Path, good_ckpt: Path, edit: str, overrides: list[str],
                                             message: str) -> None:
    bad = _edited(good_ckpt, tmp_path / "bad.ckpt", edit)
    exc = refused(tmp_path / "run", f"ckpt_path={bad}", "trainer.max_epochs=2", *overrides)
    assert isinstance(exc, CheckpointError) and re.search(message, str(exc)), str(exc)


@pytest.mark.parametrize("edit,message", [("other-version", "written by latentlab 9.1.0"),
                                          ("truncated", "truncated or corrupted"),
                                          ("foreign", "not a latentlab checkpoint")])
def test_checkpoint_loader_for_evaluation_refuses_other_versions_and_damage(tmp_path: Path, good_ckpt: Path,
                                                                             edit: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_safely(_edited(good_ckpt, tmp_path / "bad.ckpt", edit))
    assert load_checkpoint_safely(good_ckpt)["latentlab"]["method"] == "vae"


# ----- through the real command line --------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["model.latent_dim=[1,2"], "malformed command-line override"),
    (["model=nosuchmodel"], "Could not find 'model/nosuchmodel'"),
    (["model.latent_dim=abc"], "model.latent_dim must be an integer, got 'abc'"),
    (["ckpt_path=last"], "ckpt_path=last: there is no checkpoint"),
])
def test_cli_reports_one_line_and_exit_status_2(tmp_path: Path, overrides: list[str], message: str) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "latentlab.train", f"hydra.run.dir={out}", *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "latentlab: error: " in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists() and not (out / "checkpoints").exists()
