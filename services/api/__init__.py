"""API: Falcon ASGI app on uvicorn (REST, /ws, dashboard)."""
