"""/ws, the control WebSocket: hub.py (event filters, queues, the bus bridge), commands.py (client
commands), resource.py (the route and one Connection per client). Import the module you need."""
