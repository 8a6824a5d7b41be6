"""Dynamic batching: a pure policy that picks batches and a batcher that runs them on worker threads."""

from service.batching.batcher import Batcher
from service.batching.policy import BatchLimits, Decision, WorkItem, choose_batch

__all__ = ["Batcher", "BatchLimits", "Decision", "WorkItem", "choose_batch"]
