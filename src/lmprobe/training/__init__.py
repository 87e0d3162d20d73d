"""Lightning: the module, the callbacks, the trainer, the runner, DDP and interruptions."""
