"""Stage 4, train: config -> network (build, the one checkpoint loader), data, run folders, the training
loop."""
