"""`costmesh ledger ...`: reports, exports and economics from the ledger."""
