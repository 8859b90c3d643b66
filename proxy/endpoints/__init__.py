"""The gateway's own endpoints beside the relay: `/admin/*` (admin) and `/usage` (usage_report)."""
