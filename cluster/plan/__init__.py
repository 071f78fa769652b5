"""``pararl plan``: each actor's real work at a config's real shapes, on fake tensors, before any GPU
is booked.

The policy is built from ``config.json`` alone as fake tensors (no weights read, no memory or compute
spent), and one unit of each actor's work runs through the code a run uses: a sampling step and a
chunk of behaviour log-probs (rollout worker), a micro-batch forward and backward and the reference
forward (learner rank), the VQ decode and the CLIP forward (reward replica). torch's ``MemTracker``
records the peak live memory and ``FlopCounterMode`` the FLOPs; what fake tensors cannot show (ZeRO's
partitioning, CUDA context and allocator slack) comes from ``cluster.memory`` and is labelled so.
"""
