"""`dvp serve --ray`: a front door and GPU workers on a Ray cluster (docs/cluster.md)."""
