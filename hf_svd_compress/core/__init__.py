"""Model-level operations on factored layers: target matching, calibration statistics, factoring and pruning."""
