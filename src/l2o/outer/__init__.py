"""Outer trainers (meta-trainers) for learned optimizers: the interface (:mod:`l2o.outer.base`),
Persistent ES (:mod:`l2o.outer.pes`), problems with known answers (:mod:`l2o.outer.problems`) and the
``mlp-lopt`` inner problem (:mod:`l2o.outer.lopt`)."""
