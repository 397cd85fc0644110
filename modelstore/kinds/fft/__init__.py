"""The fft task kind (PERU-FFT / Post-Pruning): a sparse delta θt − θ* picked by magnitude
top-k or DARE, with float, int8 or int4 values, and budget mode."""
