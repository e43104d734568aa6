"""l2o: learned optimizers (Li & Malik 2016, 2017)."""

__version__ = "0.1.0"
