"""The case study: recorded workloads replayed through the mesh to measure savings."""
