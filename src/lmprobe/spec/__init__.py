"""What a probe reads: ProbeConfig (site, pooling, kind) and the pooling functions."""
