"""What runs on a GPU: encoders and their weights, the reconstructor network and its checkpoints."""
