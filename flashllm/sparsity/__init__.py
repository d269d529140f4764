"""Which neurons a token needs: predictors, thresholds, the reference sparse FFN, quality, training."""
