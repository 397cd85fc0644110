"""Fidelity you can promise: add-task runs the original and candidate representations of a task
on the user's own inputs and keeps the cheapest that behaves like the original (`search`), and
`modelstore eval` counts agreement the same way (`metrics`)."""

from modelstore.fidelity.data import Calibration

__all__ = ["Calibration"]
