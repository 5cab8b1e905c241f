"""AVB: Adversarial Variational Bayes (Mescheder, Nowozin & Geiger, ICML 2017).

The encoder is implicit, z = z(x, eps), so the ELBO's KL(q(z|x) || p(z)) has no closed form. A
discriminator T(x, z) trained with the logistic loss to tell (x, z ~ q(z|x)) from (x, z ~ p(z))
converges to T* = log q(z|x) - log p(z) (Proposition 1), and the encoder/decoder maximise

    E_q[-T(x, z) + log p(x | z)]                                         (eq. 3.7)

with gradients through z by reparameterisation (Proposition 2: T's own dependence on the encoder
parameters contributes nothing in expectation). Two players, so manual optimisation.

Adaptive contrast (section 4): logistic regression estimates a log-ratio well only when the two
distributions are close, and q(z|x) vs p(z) are far apart. With the Gaussian r(z|x) matching q's
Monte Carlo mean and variance (gradients stopped), KL(q||p) = KL(q||r) + E_q[log r - log p]; the
first term is invariant to z -> z~ = (z - mu) / sigma, so T compares q~(z~|x) against N(0, I) and
the objective is E_q[-T(x, z~) - log r(z|x) + log p(x, z)] (eq. 4.2), the rest in closed form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from latentlab.errors import ConfigError, NumericalError
from latentlab.models.base import (
    EvalSpec,
    LatentVariableModel,
    LikelihoodSpec,
    OptimizerFactory,
    SchedulerFactory,
    _plain,
    check_optimizer_factory,
)
from latentlab.nets import NetSpec
from latentlab.nets.avb import (
    DiscriminatorSpec,
    ImplicitDraw,
    ImplicitEncoderSpec,
    build_discriminator,
    build_implicit_encoder,
    discriminator_accuracy,
    discriminator_loss,
)

# The paper's (and official code's) discriminator optimiser: Adam with beta1 = 0.5.
DEFAULT_DISC_OPTIMIZER: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-4, betas=(0.5, 0.999))


class AVB(LatentVariableModel):
    """Implicit q(z | x, eps) + discriminator T(x, z), trained as a two-player game.

    `adaptive_contrast`: normalise z by q's Monte Carlo moments and use eq. 4.2 (needs the `basis`
    encoder, whose moments come from its noise networks, or `num_samples >= 2` draws per x).
    `disc_steps`: discriminator updates per model update. `disc_optimizer`: its own optimiser and
    learning rate (`optimizer` updates the encoder and the generative model).
    `var_floor`: added to q's variance in r(z|x) so normalisation stays finite as q sharpens.
    `gaussian_proposal`: fit a diagonal Gaussian to `proposal_samples` encoder draws and use it as the
    importance-sampling proposal for log p(x). Off (the default), q has no density, `proposal` is None
    and log p(x) comes from AIS, started at the prior or (`eval.ais_init: posterior`, as in the paper)
    at a Gaussian fitted to `posterior_draws`.
    """

    method = "avb"

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 8,
        image_shape: Sequence[int] | None = None,
        net: NetSpec | Mapping[str, Any] | None = None,
        likelihood: LikelihoodSpec | Mapping[str, Any] | str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        eval: EvalSpec | Mapping[str, Any] | None = None,
        encoder: ImplicitEncoderSpec | Mapping[str, Any] | None = None,
        discriminator: DiscriminatorSpec | Mapping[str, Any] | None = None,
        disc_optimizer: OptimizerFactory | None = None,
        adaptive_contrast: bool = False,
        disc_steps: int = 1,
        num_samples: int = 1,
        var_floor: float = 1e-4,
        gaussian_proposal: bool = False,
        proposal_samples: int = 256,
    ) -> None:
        super().__init__(data_dim, latent_dim, image_shape, net, likelihood, optimizer, scheduler, eval)
        self.encoder_spec = ImplicitEncoderSpec.coerce(_plain(encoder))
        self.discriminator_spec = DiscriminatorSpec.coerce(_plain(discriminator))
        if int(disc_steps) < 1 or int(num_samples) < 1 or int(proposal_samples) < 2:
            raise ConfigError(f"model.disc_steps and model.num_samples must be >= 1 and model.proposal_samples >= 2, "
                              f"got {disc_steps}, {num_samples}, {proposal_samples}")
        if not var_floor > 0:
            raise ConfigError(f"model.var_floor must be > 0, got {var_floor}")
        if adaptive_contrast and self.encoder_spec.kind != "basis" and int(num_samples) < 2:
            raise ConfigError("model.adaptive_contrast needs q's moments: use model.encoder.kind=basis, "
                              f"or model.num_samples >= 2 draws per x with the concat encoder (got {num_samples})")
        self.adaptive_contrast, self.disc_steps, self.num_samples = bool(adaptive_contrast), int(disc_steps), int(num_samples)
        self.var_floor, self.gaussian_proposal, self.proposal_samples = float(var_floor), bool(gaussian_proposal), int(proposal_samples)
        self.disc_optimizer_factory = disc_optimizer or DEFAULT_DISC_OPTIMIZER
        check_optimizer_factory(self.disc_optimizer_factory)
        self.encoder = build_implicit_encoder(self.encoder_spec, self.net_spec, self.data_dim, self.latent_dim, self.image_shape)
        self.discriminator = build_discriminator(self.discriminator_spec, self.data_dim, self.latent_dim)
        self.automatic_optimization = False  # two players, two optimisers
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "disc_optimizer", "net", "likelihood", "eval",
                                          "encoder", "discriminator"])
        self.hparams.update(net=self.net_spec.to_dict(), likelihood=vars(self.likelihood_spec).copy(),
                            eval=vars(self.eval_spec).copy(), encoder=self.encoder_spec.to_dict(),
                            discriminator=self.discriminator_spec.to_dict())

    # ----- posterior draws and the adversarial KL ------------------------------------------------
    def draw(self, x: Tensor, num_samples: int = 1, generator: torch.Generator | None = None) -> ImplicitDraw:
        """Reparameterised draws z (num_samples, batch, d) of q(z|x) and, if available, its moments."""
        return self.encoder(x, num_samples, generator)

    @torch.no_grad()
    def posterior_draws(self, x: Tensor, index: Tensor | None, n: int,
                        generator: torch.Generator | None = None) -> Tensor:
        """n draws of q(z|x), (n, batch, d): what posterior pictures, Gaussian fits and AIS starts use."""
        return self.draw(x, n, generator).z

    def contrast(self, draw: ImplicitDraw) -> tuple[Tensor, Tensor]:
        """(z~, log r(z|x) - log p(z)): the point T scores and the closed-form part of the KL.

        Without adaptive contrast r = p, so z~ = z and the closed-form part is 0. With it, r is the
        diagonal Gaussian with q's moments, detached (the paper stops gradients through them: the
        identity KL(q||p) = KL(q||r) + E_q[log r - log p] holds for any fixed r).
        """
        z = draw.z
        if not self.adaptive_contrast:
            return z, torch.zeros(z.shape[:-1], device=z.device, dtype=z.dtype)
        if draw.mean is None or draw.var is None:
            raise ConfigError("adaptive contrast needs q's moments: draw several z per x or use the basis encoder")
        mean, std = draw.mean.detach(), (draw.var.detach() + self.var_floor).sqrt()
        z_tilde = (z - mean) / std
        log_r = self.model.prior.log_prob(z_tilde) - std.log().sum(-1)  # N(z; mean, std^2) by change of variables
        return z_tilde, log_r - self.model.prior.log_prob(z)

    def objective_terms(self, x: Tensor, num_samples: int = 1,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-example `recon` = E_q log p(x|z) and `kl` = E_q[T(x, z~) + log r - log p], the adversarial
        estimate of KL(q(z|x) || p(z)) (exact when T is optimal); their difference is AVB's ELBO."""
        draw = self.draw(x, num_samples, generator)
        z_tilde, closed_form = self.contrast(draw)
        kl = (self.discriminator(x, z_tilde) + closed_form).mean(0)
        recon = self.model.log_likelihood(x, draw.z).mean(0)
        return {"recon": recon, "kl": kl}

    def discriminator_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, accuracy) of T on fresh draws: z~ from q (encoder frozen) against z from r0 = N(0, I)
        (the prior, or the standard Gaussian that q~ is contrasted with under AC: the same thing).
        `num_samples` draws per x, as in the model step (AC with the concat encoder needs them for moments)."""
        with torch.no_grad():
            z_q, _ = self.contrast(self.draw(x, self.num_samples))
            z_p = torch.randn_like(z_q)
        t_q, t_p = self.discriminator(x, z_q), self.discriminator(x, z_p)
        return discriminator_loss(t_q, t_p), discriminator_accuracy(t_q.detach(), t_p.detach())

    # ----- training ---------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        opt_model, opt_disc = self.optimizers()  # type: ignore[misc]

        self.toggle_optimizer(opt_model)  # T's weights are frozen while the model descends through it
        terms = self.objective_terms(x, self.num_samples)
        elbo = terms["recon"] - terms["kl"]
        loss = -elbo.mean()
        _check_finite(loss, "model loss (-ELBO)", self.global_step)
        opt_model.zero_grad()
        self.manual_backward(loss)
        opt_model.step()
        self.untoggle_optimizer(opt_model)

        self.toggle_optimizer(opt_disc)
        for _ in range(self.disc_steps):
            d_loss, d_acc = self.discriminator_terms(x)
            _check_finite(d_loss, "discriminator loss", self.global_step)
            opt_disc.zero_grad()
            self.manual_backward(d_loss)
            opt_disc.step()
        self.untoggle_optimizer(opt_disc)

        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/disc_loss", d_loss, prog_bar=True, batch_size=bs)
        self.log("train/disc_acc", d_acc, batch_size=bs)
        self.log_dict({"train/elbo": elbo.mean(), "train/recon": terms["recon"].mean(), "train/kl": terms["kl"].mean()},
                      batch_size=bs)

    def on_train_epoch_end(self) -> None:
        # manual optimisation: Lightning leaves scheduler stepping to us
        for scheduler in _as_list(self.lr_schedulers()):
            scheduler.step()

    def configure_optimizers(self) -> Any:
        opt_model = self.optimizer_factory([*self.model.parameters(), *self.encoder.parameters()])
        opt_disc = self.disc_optimizer_factory(self.discriminator.parameters())
        if self.scheduler_factory is None:
            return [opt_model, opt_disc]
        return [opt_model, opt_disc], [self.scheduler_factory(opt_model), self.scheduler_factory(opt_disc)]

    # ----- evaluation -------------------------------------------------------------------------------
    def evaluate_batch(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        terms = self.objective_terms(x, self.num_samples)
        d_loss, d_acc = self.discriminator_terms(x)
        return {"elbo": (terms["recon"] - terms["kl"]).mean(), "recon": terms["recon"].mean(), "kl": terms["kl"].mean(),
                "disc_loss": d_loss, "disc_acc": d_acc}

    def nll_estimator(self) -> str:
        if self.eval_spec.estimator == "auto":
            return "is" if self.gaussian_proposal else "ais"
        return self.eval_spec.estimator

    def proposal(self, x: Tensor, index: Tensor | None = None) -> Distribution | None:
        """None (q has no density), or with `gaussian_proposal` a diagonal Gaussian fitted to encoder
        draws, the starting point the paper's evaluation uses."""
        if not self.gaussian_proposal:
            return None
        from latentlab.metrics.loglik import fit_gaussian_proposal

        return fit_gaussian_proposal(self.posterior_draws(x, index, self.proposal_samples))

    @torch.no_grad()
    def elbo_estimate(self, x: Tensor, index: Tensor | None = None, k: int = 100,
                      generator: torch.Generator | None = None) -> Tensor:
        """AVB's own per-example bound: E_q[log p(x|z)] - KL estimate from T, averaged over k draws.

        It is a lower bound on log p(x) only as far as T is optimal (an under-trained T can put it above)."""
        terms = self.objective_terms(x, k, generator)
        return terms["recon"] - terms["kl"]

    @torch.no_grad()
    def reconstruct(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """E[x | z] for one draw z ~ q(z|x)."""
        return self.model.likelihood.mean(self.model.decode(self.posterior_draws(x, index, 1)[0]))


def _check_finite(value: Tensor, what: str, step: int) -> None:
    if not math.isfinite(float(value.detach())):
        raise NumericalError(f"AVB: non-finite {what} at step {step}; lower the learning rates or raise model.var_floor")


def _as_list(obj: Any) -> list[Any]:
    if obj is None:
        return []
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]
