"""No merge: θ* = θ0, so the stored deltas are Post-Pruning's vt = θt − θ0."""

from modelstore.merging.base import MergeMethod


class NoMerge(MergeMethod):
    name = "none"

    def merge(self, name, base, tasks):
        return base
