"""Running the app: one process listening and draining (server), or N supervised workers."""
