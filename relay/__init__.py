"""The relay protocol (v1.0-draft2): codec, node-side sessions, server and Python bindings."""
