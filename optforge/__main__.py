"""`python -m optforge ...`: the same command line as `optforge` (what torchrun starts with `-m optforge`)."""

from optforge.cli import main

main()
