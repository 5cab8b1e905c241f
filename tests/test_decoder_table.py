"""The 1-d latent's decoder table: as accurate as the float32 network it stands in for, refined where the decoder
is steep, the network itself outside its range, and Langevin chains moved through it are the network's chains to
float32 rounding (also inside ALMOND's E-step)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.func import jvp

from latentlab.decoder_table import DecoderTable
from latentlab.errors import ConfigError
from latentlab.generative import GenerativeModel
from latentlab.likelihoods import GaussianLikelihood
from latentlab.models import ALMOND
from latentlab.samplers import ULA


def softplus_decoder(seed: int = 0, gain: float = 1.0, widths: tuple[int, ...] = (20, 30, 20)) -> nn.Sequential:
    """A normal-means decoder (1 -> widths -> 1, softplus); `gain` scales the weights (a steeper curve)."""
    torch.manual_seed(seed)
    dims = [1, *widths]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Softplus()]
    net = nn.Sequential(*layers, nn.Linear(dims[-1], 1))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(gain)
    return net


def float64_curve(decoder: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, slope) of a float64 copy of the decoder: the reference both the table and the network approximate."""
    double = softplus_decoder().double()
    double.load_state_dict({k: v.double() for k, v in decoder.state_dict().items()})
    zz = z.double()
    return jvp(double, (zz,), (torch.ones_like(zz),))


def float32_curve(decoder: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, slope) of the float32 network by reverse mode, as the Langevin E-step takes them."""
    leaf = z.clone().requires_grad_(True)
    value = decoder(leaf)
    (slope,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), slope


@pytest.mark.parametrize("gain", [1.0, 3.0])
def test_table_is_at_least_as_accurate_as_the_float32_decoder(gain: float) -> None:
    decoder = softplus_decoder(gain=gain)
    table = DecoderTable.build(decoder, -4.0, 4.0)
    assert table is not None
    z = torch.empty(20000, 1).uniform_(-4.0, 4.0, generator=torch.Generator().manual_seed(1))
    truth = float64_curve(decoder, z)
    for tabled, network, exact in zip(table.evaluate(z), float32_curve(decoder, z), truth, strict=True):
        network_error = float((network.double() - exact).abs().max())
        assert float((tabled - exact).abs().max()) <= network_error


def test_a_steeper_decoder_gets_a_finer_table_and_none_past_max_points() -> None:
    smooth = DecoderTable.build(softplus_decoder(gain=1.0), -4.0, 4.0)
    steep = DecoderTable.build(softplus_decoder(gain=3.0), -4.0, 4.0)
    assert smooth is not None and steep is not None
    assert smooth.spacing == 1 / 32 and steep.spacing < smooth.spacing  # halved until verified
    assert smooth.lo == -4.0 and smooth.hi >= 4.0 and smooth.points == round(8 * 32) + 1
    assert DecoderTable.build(softplus_decoder(gain=3.0), -4.0, 4.0, max_points=int(8 / steep.spacing)) is None
    assert DecoderTable.around(softplus_decoder(), torch.tensor([[0.0], [float("nan")]])) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16-mixed run's E-step: the table stays float64
        under_autocast = DecoderTable.build(softplus_decoder(gain=1.0), -4.0, 4.0)
    assert under_autocast is not None and torch.equal(under_autocast.coefficients, smooth.coefficients)


def test_latents_outside_the_table_are_decoded_by_the_network_with_its_gradient() -> None:
    decoder = softplus_decoder()
    model = GenerativeModel(decoder, GaussianLikelihood(1), 1)
    table = DecoderTable.build(decoder, -1.0, 1.0)
    assert table is not None
    z = torch.tensor([[-3.0], [-0.5], [0.25], [1.0], [2.5], [float("nan")]], requires_grad=True)
    params = table.decode(model, z)
    (grad,) = torch.autograd.grad(params[:-1].sum(), z)
    assert torch.isnan(params[-1]).all()  # a NaN state meets the network (no index from it), as it would without
    params, grad, z = params[:-1], grad[:-1], z[:-1]
    network, slope = float32_curve(decoder, z.detach())
    outside = torch.tensor([True, False, False, False, True])
    exactly = dict(rtol=0.0, atol=1e-6)  # the network on 2 rows or on 5: its own rounding, not the table's clamp
    torch.testing.assert_close(params[outside], network[outside], **exactly)
    torch.testing.assert_close(grad[outside], slope[outside], **exactly)
    assert float((table.decode(model, z.clamp(-1, 1))[outside] - network[outside]).abs().min()) > 1e-3
    assert torch.allclose(params[~outside], network[~outside], atol=1e-6)
    assert torch.allclose(grad[~outside], slope[~outside], atol=1e-6)
    assert table.fallbacks == 3


def ula_chains(log_prob, z0: torch.Tensor, seed: int = 3) -> torch.Tensor:
    return ULA(0.01, 10).sample(log_prob, z0, torch.Generator().manual_seed(seed)).z


def test_ula_chains_through_the_table_are_the_network_chains_to_float32_rounding() -> None:
    """Same noise: the float32 network's chains and the table's differ from the float64 network's by rounding,
    so the table's may be off by at most what the float32 network's are (twice, for two independent roundings)."""
    decoder = softplus_decoder(gain=2.0)
    model = GenerativeModel(decoder, GaussianLikelihood(1), 1)
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(300, 1, generator=g)
    z0 = torch.randn(50, 300, 1, generator=g)
    table = DecoderTable.around(decoder, z0)
    assert table is not None and table.lo < float(z0.min()) - 0.9
    exact = ula_chains(partial(model.double().log_joint, x.double()), z0.double())
    model.float()
    network = ula_chains(partial(model.log_joint, x), z0)
    tabled = ula_chains(table.log_joint(model, x), z0)
    network_error = float((network.double() - exact).abs().max())
    assert 0 < float((tabled.double() - exact).abs().max()) <= 2 * network_error
    assert float((tabled - z0).abs().mean()) > 0.1  # the chains did move


def normal_means_almond(decoder_table: bool | str, latent_dim: int = 1, data_dim: int = 1) -> ALMOND:
    return ALMOND(data_dim=data_dim, latent_dim=latent_dim, net={"kind": "mlp", "hidden_dims": [10, 10], "activation": "softplus"},
                  likelihood={"kind": "gaussian", "variance": 1.0}, n_chains=20, sampler=ULA(0.01, 10), num_train=100,
                  block_rows=None, decoder_table=decoder_table, sampler_seed=5)


def test_almond_e_step_reads_a_1d_decoder_from_a_table_and_moves_the_same_chains(decoder_tables: list) -> None:
    x = 2.0 + torch.randn(100, 1, generator=torch.Generator().manual_seed(0))
    index = torch.arange(100)
    chains = {}
    model = normal_means_almond("auto")
    for setting in ("auto", False):
        model.decoder_table, model.store = setting, None  # the same decoder, fresh chains
        chains[setting], _ = model.e_step(x, index, torch.Generator().manual_seed(1))
    assert len(decoder_tables) == 1 and decoder_tables[0] is not None  # auto on CPU: the table; false: the network
    assert torch.allclose(chains["auto"], chains[False], atol=1e-5) and not torch.equal(chains["auto"], chains[False])
    assert not normal_means_almond("auto", data_dim=65)._table_wanted(torch.device("cpu"))  # a wide decoder: the network
    assert normal_means_almond(True, data_dim=65)._table_wanted(torch.device("cpu"))
    assert not model._table_wanted(torch.device("meta"))  # auto: only on CPU, whose range check reads back for free
    with pytest.raises(ConfigError, match="decoder_table=true needs a 1-d latent"):
        normal_means_almond(True, latent_dim=2)
    for bad in ("yes", 1, 0):  # 1 == True and 0 == False, but only booleans mean true and false
        with pytest.raises(ConfigError, match="decoder_table must be"):
            normal_means_almond(bad)


def test_decoder_table_true_says_once_an_epoch_that_no_table_verified(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Every E-step (one per batch) that finds no table moves the chains through the network; the warning is said
    once an epoch, not once a batch."""
    monkeypatch.setattr(DecoderTable, "around", classmethod(lambda cls, *a, **k: None))
    model = normal_means_almond(True)
    x, index = torch.randn(100, 1, generator=torch.Generator().manual_seed(0)), torch.arange(100)
    with caplog.at_level("WARNING", logger="latentlab"):
        for batch in range(3):
            model.e_step(x, index, torch.Generator().manual_seed(batch))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALMOND: no decoder table verified")]
    assert len(said) == 1 and "at epoch 0" in said[0]
