"""Chains run and back-propagated in blocks (latentlab.samplers.blocks) are the unblocked computation.

Sampling: a blocked call must be exactly the sampler run on each block in turn with that block's generator, merged
(states, step sizes, counts, kept samples, diagnostics); in law it is then the unblocked sampler, which
test_almond's statistical E-step tests check (their 8000- and 20000-row E-steps run blocked by default).
Back-propagation: parameter gradients equal those of one backward of the whole loss, to float32 rounding.
Blocks on threads (workers > 1) must give exactly what one thread gives: the same chains, the same gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentlab.nets.gaussian import GaussianEncoder
from latentlab.nets import NetSpec
from latentlab.samplers import MALA, ULA
from latentlab.samplers.blocks import backward_in_blocks, block_generators, chains_per_block, sample_in_blocks


def decoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Softplus(), nn.Linear(16, 5))


def gaussian_target():
    """log N(x; net(z), I) + log N(z; 0, I) for 3 fixed examples: a per-chain target as the E-step's."""
    net, x = decoder(), torch.randn(3, 5, generator=torch.Generator().manual_seed(1))

    def log_prob(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (net(z) - x).square().sum(-1) - 0.5 * z.square().sum(-1)

    return log_prob


def test_chains_per_block_counts_rows_of_the_chains_dimension() -> None:
    z = torch.zeros(10, 7, 2)
    assert chains_per_block(z, None) == 10 and chains_per_block(z, 1000) == 10
    assert chains_per_block(z, 21) == 3 and chains_per_block(z, 5) == 1  # at least one chain per block
    assert chains_per_block(torch.zeros(10, 2), 3) == 10  # no separate chains dimension: never split


@pytest.mark.parametrize("sampler", [ULA(0.05, 6, burn_in=2), MALA(0.05, 6, adapt_window=4)])
def test_a_blocked_call_is_the_sampler_on_each_block_in_turn(sampler) -> None:
    log_prob = gaussian_target()
    z0 = torch.randn(7, 3, 2, generator=torch.Generator().manual_seed(2))
    step = torch.rand(7, 3, generator=torch.Generator().manual_seed(3)) * 0.05 + 0.01
    count = torch.arange(21).reshape(7, 3)
    blocked = sample_in_blocks(sampler.sample, log_prob, z0, 6, torch.Generator().manual_seed(4), step_size=step,
                               step_count=count, keep_samples=True)
    gens = block_generators(torch.Generator().manual_seed(4), z0, 4)
    parts = [sampler.sample(log_prob, z0[a:b], gen, keep_samples=True, step_size=step[a:b], step_count=count[a:b])
             for (a, b), gen in zip(((0, 2), (2, 4), (4, 6), (6, 7)), gens)]  # 6 rows = 2 chains of 3 examples per block
    torch.testing.assert_close(blocked.z, torch.cat([p.z for p in parts]), rtol=0, atol=0)
    torch.testing.assert_close(blocked.step_size, torch.cat([p.step_size for p in parts]), rtol=0, atol=0)
    torch.testing.assert_close(blocked.samples, torch.cat([p.samples for p in parts], 1), rtol=0, atol=0)
    torch.testing.assert_close(blocked.step_count, count + 6)
    sizes = torch.tensor([2.0, 2.0, 2.0, 1.0])
    expected = float((torch.tensor([p.diagnostics["grad_norm"] for p in parts]) * sizes).sum() / 7)
    assert blocked.diagnostics["grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert blocked.diagnostics["n_nonfinite"] == 0.0
    assert blocked.diagnostics["nonfinite_per_chain"].shape == (7, 3)


@pytest.mark.parametrize("sampler", [ULA(0.05, 6, burn_in=2), MALA(0.05, 6, adapt_window=4), ULA(0.05, 6, guard=True),
                                     MALA(0.05, 6, guard=True)])
def test_sampler_calls_and_their_merge_read_nothing_back(sampler) -> None:
    """A sampler call and the merge of blocks make no host read (`aten::_local_scalar_dense`, a sync on a GPU): their
    scalar diagnostics stay 0-d tensors on z's device, still the per-block figures merged (a weighted mean, a sum)."""
    from torch.profiler import profile

    from latentlab.samplers.blocks import _merge

    log_prob, z0 = gaussian_target(), torch.randn(7, 3, 2, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(4)
    with profile() as prof:
        parts = [sampler.sample(log_prob, z0[a:b], generator) for a, b in ((0, 3), (3, 7))]
        merged = _merge(parts, [3, 4])
    assert sum(event.name == "aten::_local_scalar_dense" for event in prof.events()) == 0
    for key, value in merged.diagnostics.items():
        assert isinstance(value, torch.Tensor), key
        if value.dim() == 0 and key.startswith("n_"):
            assert float(value) == sum(float(p.diagnostics[key]) for p in parts)
        elif value.dim() == 0:
            assert float(value) == pytest.approx((3 * float(parts[0].diagnostics[key]) + 4 * float(parts[1].diagnostics[key])) / 7)


def test_blocked_backward_gives_the_m_step_gradient_of_one_backward() -> None:
    net, x = decoder(), torch.randn(4, 5)
    z = torch.randn(9, 4, 2)

    def loss_of(zb: torch.Tensor) -> torch.Tensor:  # a mean over all chains, as ALMOND's M-step weights it
        return (net(zb) - x).square().sum(-1).mean() * zb.shape[0] / z.shape[0]

    loss_of(z).backward()
    full = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    total = backward_in_blocks(loss_of, z, 8, torch.Tensor.backward)  # 2 chains x 4 examples per block: 5 blocks
    for p, g in zip(net.parameters(), full, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert float(total) == pytest.approx(float(loss_of(z)), rel=1e-6)


def test_blocked_backward_carries_the_gradient_into_the_encoder_with_the_kl_term() -> None:
    """The VAE warm-up: z = mu(x) + sigma(x) eps has a graph; its blocks' gradient must reach the encoder."""
    net, x = decoder(), torch.randn(4, 5)
    torch.manual_seed(1)
    encoder = GaussianEncoder.build(NetSpec(kind="mlp", hidden_dims=[8]), 5, 2, None, -12.0)
    params = [*net.parameters(), *encoder.parameters()]

    def step(rows: int | None) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        z, kl = encoder.rsample(x, 6, torch.Generator().manual_seed(5))
        backward_in_blocks(lambda zb: (net(zb) - x).square().sum() / z[..., 0].numel(), z, rows, torch.Tensor.backward,
                           kl.mean())
        return [p.grad.clone() for p in params]

    for blocked, full in zip(step(8), step(None), strict=True):
        torch.testing.assert_close(blocked, full, rtol=1e-5, atol=1e-6)


def test_auto_blocks_hold_a_fixed_number_of_activation_floats() -> None:
    """block_rows=auto: 400k floats over the decoder's widest layer (measured: a 100-wide net is 1.8x faster in
    4000-row blocks, a 10-wide one fastest in ~40k-row blocks), a number as given, null never splits."""
    from latentlab.models import ALMOND

    def rows(hidden, data_dim=1, **kw):
        return ALMOND(data_dim=data_dim, latent_dim=1, net={"kind": "mlp", "hidden_dims": hidden}, num_train=4, **kw).block_rows

    assert rows([50, 100, 50]) == 4000 and rows([10]) == 40000 and rows([512, 512], data_dim=784) == 510
    assert rows([10], block_rows=64) == 64 and rows([10], block_rows=None) is None


@pytest.mark.parametrize("sampler", [ULA(0.05, 6, burn_in=2), MALA(0.05, 6, adapt_window=4)])
def test_blocks_on_threads_give_the_chains_of_one_thread(sampler) -> None:
    """Each block's own generator, keyed from the caller's: the threads' order cannot change a draw."""
    log_prob = gaussian_target()
    z0 = torch.randn(40, 3, 2, generator=torch.Generator().manual_seed(2))

    def run(workers: int):
        return sample_in_blocks(sampler.sample, log_prob, z0, 6, torch.Generator().manual_seed(4), keep_samples=True,
                                workers=workers)

    one, three = run(1), run(3)  # 20 blocks of 2 chains
    for a, b in ((one.z, three.z), (one.step_size, three.step_size), (one.samples, three.samples)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert one.diagnostics["grad_norm"] == three.diagnostics["grad_norm"]

    def from_global_rng(workers: int) -> torch.Tensor:  # no generator: the blocks' seeds come from the global RNG
        torch.manual_seed(7)
        return sample_in_blocks(sampler.sample, log_prob, z0, 6, None, workers=workers).z

    torch.testing.assert_close(from_global_rng(1), from_global_rng(3), rtol=0, atol=0)


def test_backward_on_threads_gives_the_gradients_of_one_thread() -> None:
    """The M-step (detached chains) and the warm-up (z through the encoder, plus the KL term): the blocks'
    gradients summed in block order are the ones that one backward per block accumulates."""
    net, x = decoder(), torch.randn(4, 5)
    torch.manual_seed(1)
    encoder = GaussianEncoder.build(NetSpec(kind="mlp", hidden_dims=[8]), 5, 2, None, -12.0)
    params = [*net.parameters(), *encoder.parameters()]

    def grads(workers: int, warmup: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        if warmup:
            z, kl = encoder.rsample(x, 9, torch.Generator().manual_seed(5))
            extra = kl.mean()
        else:
            z, extra = torch.randn(9, 4, 2, generator=torch.Generator().manual_seed(5)), None
        total = backward_in_blocks(lambda zb: (net(zb) - x).square().sum() / z[..., 0].numel(), z, 8,
                                   torch.Tensor.backward, extra, params=params, workers=workers)
        return total, [torch.zeros(()) if p.grad is None else p.grad.clone() for p in params]

    for warmup in (False, True):
        (loss1, g1), (loss2, g2) = grads(1, warmup), grads(2, warmup)
        torch.testing.assert_close(loss1, loss2, rtol=0, atol=0)
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert any(float(g.abs().sum()) > 0 for g in g2[len(list(net.parameters())):]) == warmup  # encoder reached


def test_block_workers_are_checked_and_auto_is_the_cpu_thread_count() -> None:
    from latentlab.errors import ConfigError
    from latentlab.models import ALMOND
    from latentlab.samplers.blocks import resolve_workers

    assert resolve_workers("auto", torch.device("cpu")) == torch.get_num_threads()
    assert resolve_workers("auto", torch.device("meta")) == 1 and resolve_workers(3, torch.device("cpu")) == 3
    with pytest.raises(ConfigError, match="model.block_workers must be an integer >= 1 or auto, got 0"):
        ALMOND(data_dim=1, latent_dim=1, num_train=4, block_workers=0)
