"""Messaging across nodes: the local broker, extended through Scribe (see :mod:`.core`).

:mod:`~irisnode.messaging.messages` (what travels between nodes, and ``register``),
:mod:`~irisnode.messaging.core` (:class:`MessagingCore`, pure),
:mod:`~irisnode.messaging.remote` (other nodes as one endpoint of the broker),
:mod:`~irisnode.messaging.deadlines` (the deadline heap),
:mod:`~irisnode.messaging.service` (:class:`MessagingService`, the relay's view).
"""
