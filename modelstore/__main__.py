"""`python -m modelstore ...`: the command line."""

from modelstore.cli import run

run()
