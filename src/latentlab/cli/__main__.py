"""`python -m latentlab.cli ...`, the same as the `latentlab-cli` console script."""

from latentlab.cli import main

main()
