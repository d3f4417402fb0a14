"""Stages: each takes one job, reads its inputs through the artifact layer, writes one artifact; stages never import each other."""
