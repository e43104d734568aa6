"""l2o.baselines"""
