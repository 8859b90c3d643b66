"""Upstream: which provider path a request names (routing), the attempt loop (failover), the
outbound request, targets and pools, breakers, and the provider table with how each
authenticates."""
