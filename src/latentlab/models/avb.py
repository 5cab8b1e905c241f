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
The moments come from draws independent of the z they normalise: moments of the same few draws would
make z~ a studentised residual (with 2 draws exactly +/-0.707), which T would tell from N(0, I) even for
an exactly Gaussian q.

Under the posterior contract AVB answers an `ImplicitPosterior`: encoder draws (no density; the
evaluator runs IS from a kernel mixture of them in <= 2-d, else AIS from a Gaussian fitted to them) and AVB's
own discriminator-based ELBO estimate.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from latentlab.errors import ConfigError
from latentlab.models.base import (
    LatentVariableModel,
    LikelihoodSpec,
    OptimizerFactory,
    SchedulerFactory,
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
from latentlab.optim import build_optimizer
from latentlab.posterior import ImplicitPosterior

# The paper's (and official code's) discriminator optimiser: Adam with beta1 = 0.5.
DEFAULT_DISC_OPTIMIZER: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-4, betas=(0.5, 0.999))


class AVB(LatentVariableModel):
    """Implicit q(z | x, eps) + discriminator T(x, z), trained as a two-player game.

    `adaptive_contrast`: normalise z by q's Monte Carlo moments and use eq. 4.2 (the `basis` encoder
    gets them cheaply from its noise networks, `concat` from `encoder.min_moment_draws` extra draws per x).
    `disc_steps`: discriminator updates per model update. `disc_optimizer`: its own optimiser and
    learning rate (`optimizer` updates the encoder and the generative model).
    `num_samples`: z draws per x in each update. `var_floor`: added to q's variance in r(z|x) so the
    normalisation stays finite as q sharpens. `bound_chunk`: draws per pass when `posterior(x).bound(k)`
    averages AVB's ELBO estimate over k draws.
    """

    method = "avb"
    named_parts = ("encoder", "discriminator")

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 8,
        image_shape: Sequence[int] | None = None,
        net: NetSpec | Mapping[str, Any] | None = None,
        likelihood: LikelihoodSpec | Mapping[str, Any] | str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        encoder: ImplicitEncoderSpec | Mapping[str, Any] | None = None,
        discriminator: DiscriminatorSpec | Mapping[str, Any] | None = None,
        disc_optimizer: OptimizerFactory | None = None,
        adaptive_contrast: bool = False,
        disc_steps: int = 1,
        num_samples: int = 1,
        var_floor: float = 1e-4,
        bound_chunk: int = 100,
    ) -> None:
        super().__init__(data_dim, latent_dim, image_shape, net, likelihood, optimizer, scheduler)
        self.encoder_spec = ImplicitEncoderSpec.coerce(encoder)  # dict, DictConfig or spec
        self.discriminator_spec = DiscriminatorSpec.coerce(discriminator)
        if min(int(disc_steps), int(num_samples), int(bound_chunk)) < 1:
            raise ConfigError("model.disc_steps, model.num_samples and model.bound_chunk must be >= 1, "
                              f"got {disc_steps}, {num_samples}, {bound_chunk}")
        if not var_floor > 0:
            raise ConfigError(f"model.var_floor must be > 0, got {var_floor}")
        self.adaptive_contrast, self.disc_steps = bool(adaptive_contrast), int(disc_steps)
        self.num_samples, self.var_floor, self.bound_chunk = int(num_samples), float(var_floor), int(bound_chunk)
        self.disc_optimizer_factory = disc_optimizer or DEFAULT_DISC_OPTIMIZER
        check_optimizer_factory(self.disc_optimizer_factory)
        self.encoder = build_implicit_encoder(self.encoder_spec, self.net_spec, self.data_dim, self.latent_dim,
                                              self.image_shape)
        self.discriminator = build_discriminator(self.discriminator_spec, self.data_dim, self.latent_dim)
        self.automatic_optimization = False  # two players, two optimisers
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "disc_optimizer", "net", "likelihood",
                                          "encoder", "discriminator"])
        self.hparams.update(net=self.net_spec.to_dict(), likelihood=vars(self.likelihood_spec).copy(),
                            encoder=self.encoder_spec.to_dict(), discriminator=self.discriminator_spec.to_dict())

    # ----- the posterior contract ---------------------------------------------------------------
    def posterior(self, x: Tensor, index: Tensor | None = None) -> ImplicitPosterior:
        """q(z|x): encoder draws (no density) and AVB's own bound `elbo(x, k)`."""
        return ImplicitPosterior(functools.partial(self._posterior_sample, x), functools.partial(self.elbo, x))

    def _posterior_sample(self, x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.encoder(x, n, generator, moments=False).z

    @torch.no_grad()
    def elbo(self, x: Tensor, k: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """AVB's per-example ELBO estimate E_q[log p(x|z)] - KL estimate from T, over k draws, `bound_chunk`
        at a time. A lower bound on log p(x) only as far as T is optimal: an under-trained T can put it above."""
        total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for start in range(0, k, self.bound_chunk):
            n = min(self.bound_chunk, k - start)
            terms = self.objective_terms(x, n, generator)
            total = total + n * (terms["recon"] - terms["kl"])
        return total / k

    # ----- posterior draws and the adversarial KL ------------------------------------------------
    def draw(self, x: Tensor, num_samples: int = 1, generator: torch.Generator | None = None) -> ImplicitDraw:
        """Reparameterised draws z (num_samples, batch, d) of q(z|x), with q's moments under adaptive contrast."""
        return self.encoder(x, num_samples, generator, moments=self.adaptive_contrast)

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
            raise ConfigError("adaptive contrast needs q's moments: draw with moments=True")
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
        (the prior, or the standard Gaussian that q~ is contrasted with under AC: the same thing)."""
        with torch.no_grad():
            z_q, _ = self.contrast(self.draw(x, self.num_samples))
            z_p = torch.randn_like(z_q)
        t_q, t_p = self.discriminator(x, z_q), self.discriminator(x, z_p)
        return discriminator_loss(t_q, t_p), discriminator_accuracy(t_q.detach(), t_p.detach())

    # ----- training ---------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """One model step, then `disc_steps` discriminator steps. No host synchronisation here: a
        non-finite loss is caught, and blamed on its component, by the NumericalGuard callback; metrics
        are logged only on the steps the loggers write."""
        x, _ = batch
        opt_model, opt_disc = self.optimizers()  # type: ignore[misc]

        self.toggle_optimizer(opt_model)  # T's weights are frozen while the model descends through it
        terms = self.objective_terms(x, self.num_samples)
        elbo = terms["recon"] - terms["kl"]
        loss = -elbo.mean()
        opt_model.zero_grad()
        self.manual_backward(loss)
        opt_model.step()
        self.untoggle_optimizer(opt_model)

        self.toggle_optimizer(opt_disc)
        for _ in range(self.disc_steps):
            d_loss, d_acc = self.discriminator_terms(x)
            opt_disc.zero_grad()
            self.manual_backward(d_loss)
            opt_disc.step()
        self.untoggle_optimizer(opt_disc)

        if not self.logging_step():
            return
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
        opt_model = build_optimizer(self.optimizer_factory, [*self.model.parameters(), *self.encoder.parameters()])
        opt_disc = build_optimizer(self.disc_optimizer_factory, self.discriminator.parameters())
        if self.scheduler_factory is None:
            return [opt_model, opt_disc]
        return [opt_model, opt_disc], [self.scheduler_factory(opt_model), self.scheduler_factory(opt_disc)]

    # ----- evaluation -------------------------------------------------------------------------------
    def evaluate_batch(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        terms = self.objective_terms(x, self.num_samples)
        d_loss, d_acc = self.discriminator_terms(x)
        return {"elbo": (terms["recon"] - terms["kl"]).mean(), "recon": terms["recon"].mean(), "kl": terms["kl"].mean(),
                "disc_loss": d_loss, "disc_acc": d_acc}


def _as_list(obj: Any) -> list[Any]:
    if obj is None:
        return []
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]
