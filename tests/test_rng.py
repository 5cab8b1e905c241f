"""Keyed streams (latentlab.rng): draws are a function of their key, and a seeded block leaves the caller's stream."""

from __future__ import annotations

import torch

from latentlab.rng import Stream, keyed_generator, seeded_global_rng


def test_a_seeded_block_draws_by_its_seed_and_leaves_the_global_stream_where_it_was() -> None:
    def draws(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        with seeded_global_rng(seed):
            inside = torch.distributions.Gamma(2.0, 1.0).sample((5,))  # torch.distributions: global stream only
        return inside, torch.randn(5)

    inside, after = draws(7)
    torch.manual_seed(0)
    untouched = torch.randn(5)
    assert torch.equal(after, untouched)
    assert torch.equal(draws(7)[0], inside) and not torch.equal(draws(8)[0], inside)


def test_keyed_generators_depend_on_the_key_alone() -> None:
    first = torch.randn(4, generator=keyed_generator(3, Stream.SHUFFLE, 1))
    torch.randn(100)  # the global stream moving changes nothing
    assert torch.equal(torch.randn(4, generator=keyed_generator(3, Stream.SHUFFLE, 1)), first)
    assert not torch.equal(torch.randn(4, generator=keyed_generator(3, Stream.SUBSET, 1)), first)
