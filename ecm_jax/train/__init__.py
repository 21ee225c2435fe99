"""Training: the train state and optimizer, the loss, the pure step functions, data-parallel
sharding, checkpoints and run directories, and the loop that ties them to data and logs."""
