"""The overlay: node ids, links, discovery, Pastry routing and Scribe trees.

Nothing here knows about applications or the relay protocol.
"""
