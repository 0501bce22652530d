"""The hardware-exact layer that the engines and the sampler both sit on: ofast (llama2.c's
-Ofast arithmetic as CPU instructions), jit (one set of Numba options; where compiled code is
kept) and jitcache (dropping compiled code built from other sources). Nothing here imports
anything else of babyllama's."""
