"""Seconds per epoch of `latentlab-train` against a hand-written PyTorch loop (and pythae), taking turns.

    python benchmarks/vae_mnist.py                                   # 2 epochs each, then the NLLs
    python benchmarks/vae_mnist.py --epochs 10 --seeds 0 1 --pythae-python /tmp/pythae-venv/bin/python
    python benchmarks/vae_mnist.py --breakdown --train-subset 12800  # what each default costs
    python benchmarks/vae_mnist.py --trainer gpu                     # the same on a GPU (benchmarks/gpu.sh)

The model of issue 14: VAE 784-512-512-(2x32), Bernoulli decoder, MNIST 60k statically binarized at 0.5,
batch 128, Adam 1e-3, no validation. latentlab runs as `latentlab-train` builds it, default callbacks
included (progress bar, model summary, atomic checkpoint at epoch ends 30 s apart, RNG states, NaN guard, CSV logger),
one `fit` of all epochs, its progress bar drawn as in a terminal (into /dev/null; `--bar pipe`: as into a file).
The hand-written loop is what a researcher writes (`hand_vae.py`): slices of the same tensor,
`torch.optim.Adam(params, lr)` as PyTorch defaults it, from latentlab's initial weights. It runs twice:
inside this process ("hand", the strict baseline: this process's heap is already laid out) and as a script of
its own ("hand script", what `python my_vae.py` runs; the faults/step column shows what that costs it). pythae
(optional, from its own interpreter, see `pythae_vae.py`) trains the same networks. The loops take turns epoch
by epoch (hand, hand script, pythae, latentlab), so a slow phase of the shared machine hits them all, on the same
pinned CPU(s) (`--cpus`); each epoch is
timed in wall and process-CPU seconds (CPU time is the steadier number on a loaded machine). Ratios are medians
over epochs of each epoch's time over the hand loop's epoch of the same turn (paired, so the machine's drift
cancels).
Then, after equal epochs, the test NLL (importance sampling, k=1000, first 1000 test images) of both models
and their last-epoch mean training losses (same in distribution: the defaults must not change results).
`--breakdown` trains variants, each without one default, each against its own interleaved hand epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar

from hand_vae import BATCH, LATENT, LR, HandLoop, minor_faults  # this script's folder is on sys.path
from scratch import scratch_dir
from latentlab.builders import build_callbacks, build_datamodule, build_loggers, build_model, build_trainer, compose_config, resolve_paths
from latentlab.callbacks.torch_switches import flushing_denormals, set_flush_denormal_everywhere


def is_log_px(log_joint: Any, x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, k: int, chunk_size: int,
              generator: torch.Generator | None) -> torch.Tensor:
    """latentlab's importance-sampling estimator with a diagonal-Gaussian proposal, (batch,) log p(x)."""
    try:  # the estimator layer (latentlab.estimators), else the older latentlab.metrics.loglik
        from latentlab.estimators import importance_sampling
        from latentlab.posterior import GaussianPosterior

        return importance_sampling(log_joint, x, GaussianPosterior(mean, log_var), k, chunk_size, generator).log_px
    except ImportError:  # pragma: no cover - older layout
        from latentlab.metrics.loglik import importance_sampling_log_likelihood

        q = torch.distributions.Independent(torch.distributions.Normal(mean, torch.exp(0.5 * log_var)), 1)
        return importance_sampling_log_likelihood(log_joint, q, x, k=k, chunk_size=chunk_size, generator=generator)

BREAKDOWN = {  # variant -> overrides on top of the defaults: what each default costs
    "no progress bar": ["callbacks.progress_bar=null"],  # and so no bar at all (builders.build_trainer)
    "no NaN guard": ["callbacks.numerics=null"],
    "no ckpt/RNG/logger": ["callbacks.model_checkpoint=null", "callbacks.random_state=null", "logger=none",
                           "+trainer.enable_checkpointing=false"],
    "Adam loop (not fused)": ["+model.optimizer.foreach=false"],
    "log every step": ["trainer.log_every_n_steps=1"],
}


class Worker:
    """A loop in an interpreter of its own (pythae_vae.py, hand_vae.py), one epoch per `epoch()`."""

    def __init__(self, name: str, python: str, script: str, args: list[str]) -> None:
        self.name = name
        self.log = open(scratch_dir("worker-") / f"{script}.log", "w")
        cmd = [python, str(Path(__file__).with_name(script)), *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        if self._line() != "ready":
            raise RuntimeError(f"{name} did not start:\n{self.log_tail()}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def epoch(self) -> tuple[float, ...]:
        """(wall s, cpu s, mean loss, minor page faults a step)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self._line()
        if not line.startswith("epoch "):
            raise RuntimeError(f"{self.name} failed: {line!r}\n{self.log_tail()}")
        return tuple(float(v) for v in line.split()[1:])

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the worker's stderr (its folder is removed when the benchmark exits)."""
        self.log.flush()
        return Path(self.log.name).read_text()[-chars:]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # hand_vae.py stops at the end of its input; pythae after its last epoch
        self.proc.wait(timeout=120)
        self.log.close()


@contextlib.contextmanager
def script_defaults() -> Iterator[None]:
    """Run a hand-written loop as a script of its own runs: without the deterministic mode (and its flags) that
    latentlab's Trainer switches on for the whole process, and with subnormals computed as such in every thread
    (latentlab's `flush_denormal`: a script does not set it)."""
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill, flush = torch.utils.deterministic.fill_uninitialized_memory, flushing_denormals()
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    set_flush_denormal_everywhere(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        set_flush_denormal_everywhere(flush)


class TakeTurns(L.Callback):
    """Times latentlab's epochs (wall and CPU, epoch start to the next epoch's start, so the checkpoint
    written at each epoch's end counts) and runs the other loops' epochs in between, untimed here."""

    def __init__(self, others: dict[str, Any]) -> None:
        self.others = others
        self.times: dict[str, list[tuple[float, ...]]] = {name: [] for name in ["latentlab", *others]}
        self._start: tuple[float, float, int] | None = None
        self._loss: torch.Tensor | None = None
        self._batches = 0

    def _stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # a GPU epoch ends when its queued work does
        if self._start is not None:
            steps = max(1, self._batches)
            loss = float(self._loss) / steps if self._loss is not None else float("nan")
            self.times["latentlab"].append((time.perf_counter() - self._start[0], time.process_time() - self._start[1], loss,
                                            (minor_faults() - self._start[2]) / steps))
            self._start = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()
        for name, other in self.others.items():
            with script_defaults():
                self.times[name].append(other.epoch())
        self._loss, self._batches = None, 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = (time.perf_counter(), time.process_time(), minor_faults())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"].detach() if isinstance(outputs, dict) else outputs.detach()
        self._loss = loss if self._loss is None else self._loss + loss  # stays on the device: no sync
        self._batches += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()


def compose(args: argparse.Namespace, extra: list[str]) -> Any:
    overrides = [
        "data=mnist", f"paths.data_dir={Path(args.data_dir).resolve()}", "data.binarize=static",
        "data.binarize_threshold=0.5", "data.val_size=0", f"data.batch_size={BATCH}", "net=mlp_large",
        f"model.latent_dim={LATENT}", f"model.optimizer.lr={LR}", f"seed={args.seed}",
        f"trainer.max_epochs={args.epochs}", "trainer.num_sanity_val_steps=0",
        *([f"trainer={args.trainer}"] if args.trainer != "cpu" else []),
        *([f"data.train_subset={args.train_subset}"] if args.train_subset else []), *args.override, *extra,
    ]
    cfg = compose_config(overrides, output_dir=scratch_dir())
    resolve_paths(cfg)
    return cfg


def run_variant(args: argparse.Namespace, extra: list[str], workers: bool) -> tuple[dict[str, list], Any, Any, Any]:
    """One `fit` of latentlab with `extra` overrides, the hand loop taking turns with it; with `workers`, also the
    hand loop as a script of its own and pythae (given `--pythae-python`), each in its own interpreter."""
    L.seed_everything(args.seed, workers=True, verbose=False)
    cfg = compose(args, extra)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    model = build_model(cfg, dm)
    device = torch.device("cuda" if args.trainer == "gpu" else "cpu")
    x = dm.data("train").to(device)  # the very tensor latentlab trains on
    init = {**{f"enc.{k}": v for k, v in model.encoder.net.state_dict().items()},
            **{f"dec.{k}": v for k, v in model.model.decoder.state_dict().items()}}
    others: dict[str, Any] = {"hand": HandLoop(x, device, args.seed, init)}
    if workers:  # the files go once the workers have read them (a worker answers "ready" after loading)
        with tempfile.TemporaryDirectory(prefix="data-", dir=scratch_dir()) as tmp:
            files = Path(tmp)
            torch.save(x.cpu(), files / "train.pt")
            torch.save(init, files / "init.pt")
            common = ["--data", str(files / "train.pt"), "--threads", str(args.threads), "--seed", str(args.seed),
                      "--device", device.type]
            others["hand script"] = Worker("hand script", sys.executable, "hand_vae.py",
                                           [*common, "--init", str(files / "init.pt")])
            if args.pythae_python:
                others["pythae"] = Worker("pythae", args.pythae_python, "pythae_vae.py",
                                          [*common, "--epochs", str(args.epochs), "--batch", str(BATCH), "--lr", str(LR),
                                           "--latent", str(LATENT)])
    turns = TakeTurns(others)
    trainer = build_trainer(cfg, [*callbacks_as_run(cfg, args.bar), turns], build_loggers(cfg))
    trainer.fit(model, datamodule=dm)
    for other in others.values():
        if isinstance(other, Worker):
            other.close()
    return turns.times, model, others["hand"], dm


def callbacks_as_run(cfg: Any, bar: str) -> list[Any]:
    """latentlab-train's default callbacks; with `bar` "terminal" the progress bar draws as it does in a terminal
    (Rich's redraws included: what a user at a terminal pays), into /dev/null; with "pipe" as with output to a pipe
    or file (Rich then skips drawing; the benchmark's runs before 2026-12-07 17:00 UTC measured that)."""
    callbacks = build_callbacks(cfg)
    if bar != "terminal":
        return callbacks
    console = {"force_terminal": True, "file": open(os.devnull, "w")}  # noqa: SIM115 (lives as long as the process)
    return [instantiate(cfg.callbacks.progress_bar, console_kwargs=console) if isinstance(cb, RichProgressBar) else cb
            for cb in callbacks]


SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def activities() -> list[torch.profiler.ProfilerActivity]:
    extra = [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    return [torch.profiler.ProfilerActivity.CPU, *extra]


class SyncCounter(L.Callback):
    """Profiles `steps` whole training steps after `warmup` and counts host syncs: `aten::_local_scalar_dense`
    is every read of a tensor's value on the host (`.item()`, `float(t)`, `bool(t)`: a sync on a GPU), the
    cuda*Synchronize calls are explicit waits."""

    def __init__(self, steps: int, warmup: int = 5) -> None:
        self.steps, self.warmup = steps, warmup
        self.prof: torch.profiler.profile | None = None
        self.counts: dict[str, int] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.prof = torch.profiler.profile(activities=activities())
            self.prof.start()
        elif batch_idx == self.warmup + self.steps:
            self._finish()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer.fit_loop.epoch_loop.batch_progress.current.ready - self.warmup)

    def _finish(self, steps: int | None = None) -> None:
        if self.prof is None:
            return
        self.prof.stop()
        self.steps = steps if steps is not None else self.steps
        names = [event.name for event in self.prof.events()]
        self.counts = {name: names.count(name) for name in SYNC_EVENTS}
        self.prof = None


def count_syncs(args: argparse.Namespace, steps: int) -> None:
    """Host syncs per training step of latentlab (with `--override`s, e.g. model=almond) and of the hand loop."""
    cfg = compose(args, [f"+trainer.limit_train_batches={steps + 6}", "trainer.max_epochs=1"])
    counter = SyncCounter(steps)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    trainer = build_trainer(cfg, [*build_callbacks(cfg), counter], build_loggers(cfg))
    trainer.fit(build_model(cfg, dm), datamodule=dm)
    device = torch.device("cuda" if args.trainer == "gpu" else "cpu")
    hand = HandLoop(dm.data("train")[: BATCH * steps].to(device), device, args.seed)
    with torch.profiler.profile(activities=activities()) as prof:
        hand.epoch()  # one float() at its end, not per step
    names = [event.name for event in prof.events()]
    hand_steps, steps = steps, counter.steps
    print(f"\nhost syncs per training step ({steps} steps profiled, {args.trainer}; overrides {args.override or 'none'})")
    print(f"{'event':<30}{'latentlab':>11}{'hand':>8}")
    for name in SYNC_EVENTS:
        print(f"{name:<30}{counter.counts.get(name, 0) / steps:>11.2f}{names.count(name) / hand_steps:>8.2f}")


def pin(cpus: str, threads: int) -> list[int]:
    """Pin this process (and so the pythae child it starts) to fixed CPUs: the loops being compared then run on
    the same cores. On this project's 2-vCPU machine one vCPU runs Python-heavy code ~15% faster than the other
    (2026-12-07, a tight training loop pinned to each), so an unpinned comparison partly measures which vCPU the
    scheduler gave each loop."""
    if cpus == "none" or not hasattr(os, "sched_setaffinity"):
        return []
    chosen = sorted(os.sched_getaffinity(0))[-threads:] if cpus == "auto" else [int(c) for c in cpus.split(",")]
    os.sched_setaffinity(0, chosen)
    return chosen


def median(rows: list[tuple[float, ...]], i: int) -> float:
    return statistics.median(r[i] for r in rows)


def paired_ratio(rows: list[tuple[float, ...]], base: list[tuple[float, ...]], i: int) -> float:
    """Median over epochs of each epoch's time over the `base` epoch run just before it: the machine's slow and fast
    phases (+-15% here within minutes) then cancel in each pair instead of landing on one loop's median."""
    return statistics.median(r[i] / b[i] for r, b in zip(rows, base, strict=True))


def print_table(title: str, times: dict[str, list], base: dict[str, list] | None = None) -> None:
    """Medians and paired ratios to the hand loop; `base` gives a row its own interleaved hand epochs (default: "hand")."""
    print(f"\n{title}")
    print(f"{'loop':<30}{'epochs':>7}{'wall s/epoch':>14}{'ratio':>7}{'cpu s/epoch':>13}{'ratio':>7}{'last loss':>11}"
          f"{'faults/step':>13}")
    for name, rows in times.items():
        hand = (base or {}).get(name, times.get("hand", rows))
        print(f"{name:<30}{len(rows):>7}{median(rows, 0):>14.2f}{paired_ratio(rows, hand, 0):>7.2f}{median(rows, 1):>13.2f}"
              f"{paired_ratio(rows, hand, 1):>7.2f}{rows[-1][2]:>11.2f}{median(rows, 3):>13.0f}")
    for other in ("hand script", "pythae"):  # the goal's other ratios, printed rather than left to divide
        if other in times and "latentlab" in times:
            lab, them = times["latentlab"], times[other]
            print(f"latentlab / {other}: {paired_ratio(lab, them, 0):.2f} wall, {paired_ratio(lab, them, 1):.2f} cpu "
                  f"(median over epochs, each latentlab epoch over the {other} epoch just before it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--cpus", default="auto", help="pin this process and pythae's to these CPUs (e.g. 1 or 0,1); "
                        "auto: one CPU per thread, the last ones; none: no pinning")
    parser.add_argument("--trainer", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--bar", default="terminal", choices=["terminal", "pipe"],
                        help="latentlab's progress bar draws as in a terminal (into /dev/null) or as into a pipe")
    parser.add_argument("--train-subset", type=int, default=None, help="fewer training images (quick runs)")
    parser.add_argument("--pythae-python", default=None, help="interpreter of a venv with pythae 0.1.2: third column")
    parser.add_argument("--breakdown", action="store_true", help="also time variants, each without one default")
    parser.add_argument("--nll-k", type=int, default=1000)
    parser.add_argument("--nll-n", type=int, default=1000, help="test images for the NLL line (0: skip it)")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for latentlab")
    parser.add_argument("--count-syncs", type=int, default=0, metavar="STEPS",
                        help="only count host syncs per step over STEPS profiled steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpus = pin(args.cpus, args.threads)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"VAE 784-512-512-(2x{LATENT}), MNIST binarized at 0.5, batch {BATCH}, Adam {LR}, {args.threads} thread(s), "
          f"{args.trainer}, torch {torch.__version__}, {when}, CPUs {cpus or 'not pinned'}, "
          f"progress bar drawn as into a {args.bar}")
    if args.count_syncs:
        args.seed = args.seeds[0]
        count_syncs(args, args.count_syncs)
        return
    losses: dict[str, list[float]] = {}
    for seed in args.seeds:
        args.seed = seed
        times, model, hand, dm = run_variant(args, [], True)
        for name, rows in times.items():
            losses.setdefault(name, []).append(rows[-1][2])
        print_table(f"seed {seed}: latentlab-train defaults (goal: <= 1.05x hand, <= 0.87x pythae)", times)
        if args.nll_n:
            nll(args, model, hand, dm)
        if args.breakdown:
            rows: dict[str, list] = {}
            base: dict[str, list] = {}
            for name, extra in [("defaults", []), *BREAKDOWN.items()]:
                variant, _, _, _ = run_variant(args, extra, False)
                rows[f"latentlab {name}"], base[f"latentlab {name}"] = variant["latentlab"], variant["hand"]
            print_table(f"seed {seed}: breakdown (each variant drops one default; ratios to its own interleaved hand epochs)",
                        rows, base)
    print_losses(losses, args.epochs)


def print_losses(losses: dict[str, list[float]], epochs: int) -> None:
    """Last-epoch mean training loss over seeds, and latentlab's paired difference to the hand loop (same init)."""
    def mean_sd(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f}" + (f" +- {statistics.stdev(v):.2f}" if len(v) > 1 else "")
    diff = [a - b for a, b in zip(losses["latentlab"], losses["hand"])]
    se = f" +- {statistics.stdev(diff) / math.sqrt(len(diff)):.2f} (SE)" if len(diff) > 1 else ""
    print(f"\nepoch-{epochs} training loss over {len(diff)} seed(s), mean +- sd: "
          + ", ".join(f"{name} {mean_sd(v)}" for name, v in losses.items())
          + f"; latentlab - hand {statistics.mean(diff):+.2f}{se}")


def lab_gaussian(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's q(z|x) as (mean, log_var), through the posterior contract where it exists."""
    if hasattr(model, "posterior"):
        return model.posterior(x).gaussian()
    return model.encode(x)


def nll(args: argparse.Namespace, model: Any, hand: HandLoop, dm: Any) -> None:
    """Test NLL of both models after the same number of epochs, one estimator and budget."""
    device = next(model.parameters()).device
    x_test = dm.data("test")[: args.nll_n].to(device)
    model.eval()
    results = {}
    with torch.no_grad():
        for name, log_joint, (mean, log_var) in (("latentlab", model.model.log_joint, lab_gaussian(model, x_test)),
                                                 ("hand", hand.model.log_joint, hand.model.gaussian(x_test))):
            generator = torch.Generator(device=device).manual_seed(1)
            results[name] = -is_log_px(log_joint, x_test, mean, log_var, args.nll_k, 100, generator).mean().item()
    nll_lab, nll_hand = results["latentlab"], results["hand"]
    print(f"test NLL (IS, k={args.nll_k}, first {x_test.shape[0]} test images) after {args.epochs} epochs each: "
          f"latentlab {nll_lab:.2f} nats, hand {nll_hand:.2f} nats")


if __name__ == "__main__":
    main()
