"""The weight-sync contract between the learner (sender) and the rollout workers (receivers).

Both sides must agree on three things, so they live here once: how weights are cut into
byte-bounded buckets and hashed (``buckets``), what a bucket looks like on the object store
(``wire``), and the broadcast protocol of the collective transport (``collective``).
"""
