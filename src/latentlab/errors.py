"""Errors that name the problem and the fix. The CLI turns them into one message and exit code 2."""


class LatentlabError(Exception):
    """Base class: anything a user can fix (bad config, bad file, bad checkpoint)."""


class ConfigError(LatentlabError):
    """A config value is impossible (e.g. latent_dim <= 0); the message names the key and what is allowed."""


class DataError(LatentlabError):
    """A data file or directory is missing, truncated or corrupted; the message says how to fix it."""


class CheckpointError(LatentlabError):
    """A checkpoint is missing, corrupted, or from another method/version."""


class NumericalError(LatentlabError):
    """NaN/inf detected in a loss, gradient or sampler state; names the step and component."""


class Preempted(Exception):
    """Not an error: the run was told to stop (SIGTERM, Slurm preemption) and wrote its checkpoint;
    the entry point exits with `latentlab.entry.EXIT_PREEMPTED`, and `ckpt_path=last` resumes it."""
