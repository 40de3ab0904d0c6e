"""The baselines' recurrences (Gated DeltaNet, Mamba-2): each an op by chunks and its scan."""

from m2rnn_jax.recurrences.diagonal_ssm import diagonal_ssm, diagonal_ssm_scan
from m2rnn_jax.recurrences.gated_delta import gated_delta_rule, gated_delta_rule_scan

__all__ = ["diagonal_ssm", "diagonal_ssm_scan", "gated_delta_rule", "gated_delta_rule_scan"]
