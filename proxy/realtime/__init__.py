"""WebSocket sessions: the Realtime API relayed frame by frame (realtime, websocket)."""
