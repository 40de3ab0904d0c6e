"""Language modelling: M²RNN, Gated DeltaNet, Mamba-2 and attention hybrids of equal size on
one byte-level corpus of Python sources (``m2rnn-compare``); configs, corpus manifest, analyses
and results in README.md."""
