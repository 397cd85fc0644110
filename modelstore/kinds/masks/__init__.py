"""The one-bit task kinds: TALL masks and EMR (vector masks over θ*−θ0), BitDelta, and their
bit packing."""
