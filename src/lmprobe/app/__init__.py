"""The Hydra application: the run job, its config schema and the lmprobe command."""
