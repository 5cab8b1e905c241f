"""Flushing subnormal floats to zero (`flush_denormal`): in every thread torch computes on, and without changing a
weight of a training run."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from latentlab.callbacks.torch_switches import flushing_denormals, set_flush_denormal_everywhere

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32: below it, subnormals


def subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < TINY)).sum())


def adam_left_subnormal(size: int = 1 << 20) -> int:
    """A fused Adam step (split over torch's threads) on a zero gradient whose first moment holds the smallest
    subnormal everywhere: 0.9 x it rounds back to it, unless the thread computing it reads it as zero. The
    subnormals left in the moment."""
    p = torch.nn.Parameter(torch.ones(size))
    p.grad = torch.zeros_like(p)
    opt = torch.optim.Adam([p], fused=True)
    opt.step()
    moment = opt.state[p]["exp_avg"]
    moment.view(torch.int32).fill_(1)  # the bit pattern of 2**-149: no float conversion that could flush it here
    opt.step()
    return subnormals(moment)


def test_the_flush_reaches_every_thread_torch_splits_work_over() -> None:
    """`torch.set_flush_denormal` sets the calling thread's flag only: the OpenMP worker that computes its share of
    an op keeps computing subnormals (and on an Intel CPU pays a microcode assist for each). The switch reaches it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(1 << 20).mul(2.0)  # the worker thread exists
        if not set_flush_denormal_everywhere(False):  # and neither thread flushes
            pytest.skip("this CPU cannot flush subnormals")
        size = 1 << 20
        assert adam_left_subnormal(size) == size
        torch.set_flush_denormal(True)
        assert 0 < adam_left_subnormal(size) < size, "torch's own switch now reaches the workers: simplify"
        assert set_flush_denormal_everywhere(True) and flushing_denormals()
        assert adam_left_subnormal(size) == 0
        assert set_flush_denormal_everywhere(False) and not flushing_denormals()
        assert adam_left_subnormal(size) == size
    finally:
        set_flush_denormal_everywhere(False)
        torch.set_num_threads(threads)


class FlushProbe(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flushing = flushing_denormals()


def train_digits_vae(tmp_path, flush: bool) -> tuple[L.LightningModule, torch.Tensor, bool]:
    """latentlab-train's default VAE on the digits, 20 epochs (820 Adam steps): weights, Adam's first moments, and
    whether the run flushed."""
    from latentlab.builders import build_datamodule, build_model, build_trainer, compose_config, resolve_paths

    cfg = compose_config(["trainer.max_epochs=20", "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0",
                          "test=false", "callbacks=none", "logger=none", f"flush_denormal={str(flush).lower()}"],
                         output_dir=tmp_path / str(flush))
    resolve_paths(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg)
    model, probe = build_model(cfg, dm), FlushProbe()
    trainer = build_trainer(cfg, [probe], [])
    trainer.fit(model, datamodule=dm)
    assert not flushing_denormals()  # the caller's setting is back after the run
    moments = torch.cat([s["exp_avg"].flatten() for s in trainer.optimizers[0].state.values()])
    return model, moments, probe.flushing


def test_flushing_subnormals_changes_no_weight_of_a_run(tmp_path) -> None:
    """The weights of the digits' rarely inked pixels get zero gradients for long stretches, and their Adam moments
    decay by 0.9 a step into the subnormal range and stay there (0.9 x 2**-149 rounds back to 2**-149). An update from
    such a moment is below 1e-33 x lr, which moves no float32 weight: with the flush the same run ends with the same
    weights, bit for bit, and no subnormal in Adam's state."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    plain, plain_moments, plain_flushing = train_digits_vae(tmp_path, flush=False)
    flushed, flushed_moments, flushed_flushing = train_digits_vae(tmp_path, flush=True)
    assert (plain_flushing, flushed_flushing) == (False, True)
    assert subnormals(plain_moments) > 10_000  # what the flush is for (34,741 of 61k moments here)
    assert subnormals(flushed_moments) == 0
    for ours, theirs in zip(plain.parameters(), flushed.parameters()):
        assert torch.equal(ours, theirs)


class Boom(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.flushing = flushing_denormals()
        raise RuntimeError("boom")


def test_a_run_that_raises_gives_the_callers_setting_back(tmp_path) -> None:
    """Lightning calls no `teardown` when a run raises (a NaN stop, a bad batch): the flag must not outlive it."""
    from latentlab.builders import build_datamodule, build_model, build_trainer, compose_config, resolve_paths

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    cfg = compose_config(["trainer.max_epochs=1", "test=false", "callbacks=none", "logger=none"], output_dir=tmp_path)
    resolve_paths(cfg)
    dm = build_datamodule(cfg)
    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        build_trainer(cfg, [boom], []).fit(build_model(cfg, dm), datamodule=dm)
    assert boom.flushing and not flushing_denormals()
