"""The local spot cloud: the whole spot lifecycle on one machine, no AWS account."""
