"""metrics.md: one run's metrics grouped (likelihood, bounds and gaps, sample quality), one sign per group.

metrics.json stays flat (`test/nll`, ...); this is its human-readable page. Each group states its sign
convention and provenance: how log p(x) was estimated (estimator, budget, convergence diagnostic), and that
FID/KID/IS are computed in latentlab's own classifier features, so they are not comparable to papers'
Inception-based numbers.
"""

from __future__ import annotations

from typing import Any, Mapping

CONVERGENCE_FLAG_NATS = 0.1
#: sample-quality metrics (key suffix, label); each also appears as latent_prior_<key> (samples through a fitted prior)
QUALITY = (("fid", "FID"), ("kid_mean", "KID"), ("is_mean", "IS"), ("precision", "precision"), ("recall", "recall"))  # the same threshold as latentlab.estimators.CONVERGENCE_FLAG_NATS (a test keeps them equal)

#: (title, sign convention, [(key suffix, label, sign)]): sign -1 shows -value so the whole group reads one way
GROUPS: tuple[tuple[str, str, tuple[tuple[str, str, int], ...]], ...] = (
    ("Likelihood", "negative log-likelihoods in nats per example: lower is better", (
        ("nll", "NLL (the protocol's estimate)", 1), ("exact_log_lik", "NLL by quadrature (2-d latents: exact)", -1),
    )),
    ("Bounds and gaps", "bounds as negative log-likelihoods (nats, lower is better); gaps in nats, >= 0, smaller is better", (
        ("gap_log_px", "NLL by AIS (the gaps' reference)", -1), ("gap_elbo", "-bound of the method's posterior", -1),
        ("gap_elbo_local", "-ELBO of the best per-example Gaussian", -1), ("inference_gap", "inference gap", 1),
        ("approximation_gap", "approximation gap", 1), ("amortization_gap", "amortization gap", 1),
        ("gap_local_not_converged", "examples whose best local Gaussian did not converge (count)", 1),
        ("bdmc_lower", "BDMC: NLL upper bound (forward AIS)", -1), ("bdmc_upper", "BDMC: NLL lower bound (reverse AIS)", -1),
        ("bdmc_gap", "BDMC gap (AIS error bound)", 1),
    )),
    ("Sample quality", "in latentlab's own per-dataset classifier features, NOT comparable to Inception-based "
     "FID/KID/IS in papers; FID, KID lower is better, IS, precision, recall higher is better", (
        *((key, label, 1) for key, label in QUALITY),
        *((f"latent_prior_{key}", f"{label}, learned latent prior", 1) for key, label in QUALITY),
        ("classifier_acc", "classifier test accuracy", 1),
    )),
)


def _fmt(value: Any, se: Any, sign: int) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{sign * float(value):.4f}"
    return text + (f" ± {float(se):.4f}" if isinstance(se, (int, float)) and se == se else "")


def provenance(record: Mapping[str, Any], stage: str = "test") -> str:
    """One line: how `stage/nll` was obtained and whether it converged (flagged above 0.1 nats)."""
    budget = record.get(f"{stage}/nll_budget")
    if budget is None:
        return ""
    half = record.get(f"{stage}/nll_half_gap")
    line = f"{stage}/nll by {budget} (`eval/nll={record.get(f'{stage}/nll_settings', '?')}`)"
    if isinstance(half, (int, float)):
        flag = " **NOT CONVERGED: raise the budget**" if half > CONVERGENCE_FLAG_NATS else ""
        line += f"; half budget minus full budget: {half:.3f} nats{flag}"
    return line


def metrics_markdown(record: Mapping[str, Any], title: str = "metrics", stage: str = "test") -> str:
    """The grouped page for one run's flat metrics `record`."""
    lines, shown = [f"# {title}", ""], set()
    for name, convention, rows in GROUPS:
        present = [(f"{stage}/{key}", label, sign) for key, label, sign in rows if f"{stage}/{key}" in record]
        if not present:
            continue
        lines += [f"## {name}", "", f"_{convention}_", "", "| metric | value |", "| --- | --- |"]
        for key, label, sign in present:
            lines.append(f"| {label} (`{key}`) | {_fmt(record[key], record.get(key + '_se'), sign)} |")
            shown |= {key, key + "_se"}
        if name == "Likelihood" and provenance(record, stage):
            lines += ["", provenance(record, stage)]
            shown |= {f"{stage}/nll_{k}" for k in ("budget", "settings", "estimator", "half_gap")}
        lines.append("")
    rest = {k: v for k, v in record.items() if k not in shown}
    if rest:
        lines += ["## Other", "", "| key | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {_fmt(v, None, 1)} |" for k, v in sorted(rest.items())]
    return "\n".join(lines) + "\n"
