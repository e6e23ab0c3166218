"""The daemon's web side ([web]): the dashboard, Prometheus metrics at /metrics and /healthz.

It runs in the daemon's process, in a thread of its own (uvicorn serving a Starlette app), and sees the
daemon only through `view.DaemonView`: a snapshot of the streams' in-memory state, the event log read
read-only, and mute and mark, which go to the store's writer exactly as control-channel and MQTT
commands do. Nothing here can stop monitoring: a failure is logged and the daemon goes on.
"""
