"""ALMOND's posterior contract: p(z | x) as draws of Langevin chains, there being no encoder to give a density.

Training examples the E-step has visited are represented by their persistent chains (`ChainPosterior`: the
chains' own moment fit, the paper's summary); anything else (validation, test, unvisited examples) by fresh
chains started at the warm-up encoder or the prior and moved `eval_langevin_steps` times, on a keyed stream so
that an evaluation draws the same chains whenever it runs. The evaluator then estimates log p(x) from these
draws (IS from a kernel mixture, or AIS from a Gaussian fitted to them).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from latentlab.errors import NumericalError
from latentlab.posterior import SamplePosterior, moment_fit
from latentlab.rng import SPLIT_IDS, Stream
from latentlab.samplers.blocks import sample_in_blocks


class ChainPosterior(SamplePosterior):
    """The persistent chains of training examples: their moment fit is the chains' own (the paper's summary,
    e.g. its latent-map figure), whatever n; more draws than chains continue them."""

    def fitted_gaussian(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return moment_fit(self.sample(max(2, self.fit_draws), generator))


class ChainsPosterior:
    """`posterior` and `aggregate_posterior` of ALMOND (mixed in before `LatentVariableModel`): the chains of
    visited training examples, fresh chains otherwise. Uses the model's `store`, `sampler`, `model`,
    `block_rows`, `eval_chains`, `eval_langevin_steps`, `initial_states`, `chain_states`, `current_step_size`, `_target`,
    `_workers` and `_generator`."""

    store: Any
    sampler: Any
    model: Any
    block_rows: int | None
    _target: Any
    n_chains: int
    eval_chains: int
    eval_langevin_steps: int
    _trainer: Any
    current_epoch: int

    @torch.no_grad()
    def aggregate_posterior(self, x: Tensor, generator: torch.Generator | None = None, batch_size: int = 500, *,
                            index: Tensor | None = None) -> Tensor:
        """The first persistent chain of each training example `index` (default all; x (N, D) the training split)
        the E-step visited; unvisited examples get fresh chains as in `posterior`."""
        store = self.store
        if store is None or store.num_examples != x.shape[0]:
            return super().aggregate_posterior(x, generator, batch_size, index=index)
        index = torch.arange(x.shape[0]) if index is None else index.cpu()
        z = store.z[0][index.to(store.z.device)].clone()
        fresh = (~store.visited[index.to(store.z.device)]).nonzero().flatten().cpu()
        for rows in fresh.split(batch_size):
            z[rows] = self.posterior(x[index[rows].to(x.device)], None).sample(1, generator)[0].to(z)
        return z

    def _current_split(self) -> str:
        """The split the trainer works on: val/test/predict in those loops, train while fitting or after a fit
        (callbacks placing training examples), val without a trainer (an index then counts positions in a split
        without chains). Unseen data after a fit: pass no index, or split="test"."""
        trainer = self._trainer
        if trainer is None or trainer.validating or trainer.sanity_checking:
            return "val"
        if trainer.testing or trainer.predicting:
            return "test" if trainer.testing else "predict"
        return "train" if trainer.training or trainer.state.fn == "fit" else "val"

    def posterior(self, x: Tensor, index: Tensor | None = None, split: str | None = None) -> SamplePosterior:
        """Samples of p(z | x): the persistent chains when these are visited training examples (`split`, default
        what the trainer runs, is train), else `eval_chains`-sized batches of fresh chains."""
        split = split or self._current_split()
        log_joint = partial(self.model.log_joint, x)
        store = self.store
        if split == "train" and index is not None and store is not None and bool(store.visited[index.to(store.z.device)].all()):
            return ChainPosterior(partial(self._persistent_draws, x, index), log_joint, fit_draws=self.n_chains)
        return SamplePosterior(partial(self._fresh_draws, x, split, index), log_joint, fit_draws=self.eval_chains)

    def _persistent_draws(self, x: Tensor, index: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """The chains themselves (n <= n_chains), then their states after each further `langevin_steps` moves
        (not written back), until there are n draws."""
        z = self.chain_states(index).to(x.device)
        draws = [z]
        while sum(d.shape[0] for d in draws) < n:
            log_prob, rows, _ = self._target(x, z)
            z = sample_in_blocks(self.sampler.sample, log_prob, z, rows, generator,
                                 step_size=self.current_step_size(), workers=self._workers(x)).z
            draws.append(z)
        return torch.cat(draws)[:n]

    def _fresh_draws(self, x: Tensor, split: str, index: Tensor | None, n: int, generator: torch.Generator | None) -> Tensor:
        """n fresh chains from the encoder (after a warm-up) or the prior, `eval_langevin_steps` moves each."""
        if generator is None:
            first = int(index[0]) if index is not None and index.numel() else 0
            generator = self._generator(x.device, Stream.LANGEVIN_EVAL, SPLIT_IDS.get(split, 3), self.current_epoch, first)
        z = self.initial_states(x, n, generator)
        if self.eval_langevin_steps == 0:
            return z
        log_prob, rows, _ = self._target(x, z)
        z = sample_in_blocks(self.sampler.with_steps(self.eval_langevin_steps).sample, log_prob, z, rows, generator,
                             step_size=self.current_step_size(), workers=self._workers(x)).z
        if not bool(torch.isfinite(z).all()):
            raise NumericalError("ALMOND evaluation sampler produced non-finite chain states; lower sampler.step_size")
        return z
