"""The queue protocol shared by the scheduler and the workers: versioned messages and the
Redis Streams delivery lifecycle of a run (enqueue, claim, ack, fail, reclaim, dead-letter)."""
