"""Stage 4, train: config -> network (the one checkpoint loader), data, run folders, the training loop."""
