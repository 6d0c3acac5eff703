"""`costmesh router ...`: train and evaluate the tier classifier."""
