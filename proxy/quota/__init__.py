"""Admission: the policy over every limit that applies (quota), the tracker protocol (tracker,
window) with its memory and Redis backends, refusals and the x-ratelimit-* headers."""
