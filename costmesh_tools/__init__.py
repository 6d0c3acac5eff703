"""The costmesh command and the work it does beside serving: evaluations, training,
the case study, the ledger's reports. Nothing here serves requests."""
