"""`python -m pipelines` is the same as the `lepton` command."""

from pipelines.cli import main

main()
