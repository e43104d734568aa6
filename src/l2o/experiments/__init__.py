"""l2o.experiments"""
