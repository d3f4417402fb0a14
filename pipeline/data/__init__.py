"""Images in and out: datasets, decoding, pixel transforms, the demo set, feature batches for training."""
