"""The sinks a settled request feeds and what operators read: the interaction log (logbook),
Prometheus metrics (metrics, series, summary, worker_metrics), traces (tracing), and health."""
