"""The aiokafka internals the Kafka engine reads, in one place.

aiokafka (0.14) runs one background task per consumer (fetching) and one per producer
(sending). When that task ends on an unexpected error (under uvloop, a RuntimeError writing to a
connection the server just closed: aio-libs/aiokafka#1038, #983), the client goes on accepting
calls and never does the work again: ``getmany`` returns nothing, records are never sent. Its
public API does not say so; these functions read the tasks it keeps. The pin in pyproject.toml
(``aiokafka>=0.14,<0.15``) is narrow for that reason, and ``tests/test_kafka_broker.py``
(``test_a_client_whose_background_task_died_is_replaced_and_work_goes_on``) kills each task
the way the server does and checks these functions see it: one test per assumption.
"""

from __future__ import annotations

import asyncio


def _ended(task: object) -> bool:
    return isinstance(task, asyncio.Future) and task.done()


def fetching_ended(consumer: object) -> bool:
    """Whether ``consumer``'s (an ``AIOKafkaConsumer``) fetch task ended for good.

    Assumes ``consumer._fetcher.error_future``: the fetch routine's task, done once it ended.
    False when the attribute is missing (a client not started yet)."""
    return _ended(getattr(getattr(consumer, "_fetcher", None), "error_future", None))


def sending_ended(producer: object) -> bool:
    """Whether ``producer``'s (an ``AIOKafkaProducer``) send task ended for good.

    Assumes ``producer._sender.sender_task``: the send routine's task, done once it ended.
    False when the attribute is missing (a client not started yet)."""
    return _ended(getattr(getattr(producer, "_sender", None), "sender_task", None))


__all__ = ["fetching_ended", "sending_ended"]
