"""Dynamic batching: a pure policy that picks batches, admission that decides whether a request may
queue, and a batcher that runs the batches on worker threads."""

from service.batching.admission import Admission, Ticket
from service.batching.batcher import Batched, Batcher
from service.batching.policy import BatchLimits, Decision, WorkItem, choose_batch

__all__ = ["Admission", "Batched", "Batcher", "BatchLimits", "Decision", "Ticket", "WorkItem", "choose_batch"]
