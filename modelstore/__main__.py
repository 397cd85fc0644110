"""`python -m modelstore ...`: the command line."""

from .cli import main

main()
