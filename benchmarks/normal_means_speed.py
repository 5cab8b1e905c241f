"""What one epoch of the many-normal-means experiment costs, by `model.decoder_table` and `model.block_rows`
(issue 14, goal 3).

    python benchmarks/normal_means_speed.py                       # the mixture prior's nets, ~3 minutes
    python benchmarks/normal_means_speed.py --prior normal --hidden 10 --draws 10

Full batch (n = 1000), so each epoch is one step: the VAE warm-up (vae_num_samples draws per example through
encoder and decoder) and the Langevin phase (100 chains x 10 ULA moves, then the M-step over all chains). Runs
`ALMOND.training_step` itself (built from `experiment=almond_normal_means`) outside the Trainer, repeats
interleaved across settings so the shared machine's noise hits each alike; medians. decoder_table=auto moves the
chains through the decoder's verified Hermite table (the 1-d latent), false through the network; block_rows then
splits only the M-step's (and the warm-up's) backward. The last column extrapolates the paper's budget (1000 warm-up
+ 1000 Langevin epochs) for one prior. The decoder is freshly initialised: a trained one is steeper and gets a finer
table (the mixture's: 1/128 spacing against 1/32), a few ms more a Langevin epoch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from latentlab import builders

PAPER_EPOCHS = 1000


def build(prior: str, hidden: list[int], draws: int, rows: str, table: str):
    overrides = ["experiment=almond_normal_means", f"data.prior={prior}", f"net.hidden_dims=[{','.join(map(str, hidden))}]",
                 f"model.vae_num_samples={draws}", f"model.block_rows={rows}", f"model.decoder_table={table}"]
    cfg = builders.compose_config(overrides, output_dir="/tmp/normal_means_speed")
    builders.resolve_paths(cfg)
    datamodule = builders.build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = builders.build_model(cfg, datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    model.allocate_chains(len(batch[1]))
    optimizers = model.configure_optimizers()
    optimizers = optimizers[0] if isinstance(optimizers, tuple) else optimizers
    model.optimizers = lambda: optimizers  # what the Trainer would hand back
    model.manual_backward = lambda loss: loss.backward()
    model.log = lambda *a, **k: None
    return model, batch


def epoch_seconds(model, batch, phase: str) -> float:
    vae = phase == "vae"
    with mock.patch.object(type(model), "in_vae_phase", new=property(lambda self: vae)), \
            mock.patch.object(type(model), "langevin_epoch", new=property(lambda self: 200)), \
            mock.patch.object(type(model), "current_epoch", new=property(lambda self: 1200)), \
            mock.patch.object(type(model), "logging_step", new=lambda self: False):
        start = time.perf_counter()
        model.training_step(batch, 0)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default="mixture")
    parser.add_argument("--hidden", type=int, nargs="+", default=[50, 100, 50])
    parser.add_argument("--draws", type=int, default=100, help="vae_num_samples (the mixture script's 100)")
    parser.add_argument("--rows", nargs="+", default=["null", "auto"], help="block_rows values")
    parser.add_argument("--tables", nargs="+", default=["false", "auto"], help="decoder_table values")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts (model.block_workers=auto: as many block workers)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    settings = [(r, tab) for tab in dict.fromkeys(["false", *args.tables]) for r in dict.fromkeys(["null", *args.rows])]
    configs = [(*s, t) for t in args.threads for s in settings]  # the unblocked network on the fewest threads first
    built = {s: build(args.prior, args.hidden, args.draws, *s) for s in settings}
    times: dict[tuple[str, str, int, str], list[float]] = {(*c, p): [] for c in configs for p in ("vae", "langevin")}
    for _ in range(args.repeats):
        for r, tab, t in configs:
            torch.set_num_threads(t)
            for phase in ("vae", "langevin"):
                times[(r, tab, t, phase)].append(epoch_seconds(*built[(r, tab)], phase))
    print(f"\nmany normal means, prior={args.prior}, nets {args.hidden}, {args.draws} VAE draws; median of "
          f"{args.repeats}, interleaved\n")
    print("| decoder_table | block_rows | threads (= block workers) | VAE epoch (s) | Langevin epoch (s) | "
          "vs the first row | paper budget, one prior (min) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = sum(statistics.median(times[(*configs[0], p)]) for p in ("vae", "langevin"))
    for r, tab, t in configs:
        vae, lang = (statistics.median(times[(r, tab, t, p)]) for p in ("vae", "langevin"))
        total = PAPER_EPOCHS * (vae + lang) / 60
        rows = built[(r, tab)][0].block_rows
        print(f"| {tab} | {r} ({rows or 'all'} rows) | {t} | {vae:.3f} | {lang:.3f} | {base / (vae + lang):.2f}x | "
              f"{total:.1f} |")


if __name__ == "__main__":
    main()
