"""`costmesh cache ...`: train, calibrate and evaluate the equivalence model."""
