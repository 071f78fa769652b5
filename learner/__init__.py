"""The learner: group advantages, trajectory log-probs of a masked-diffusion policy, the clipped ParaRL
loss with KL, DeepSpeed ranks as Ray actors, exact-resume checkpoints, export, and weight buckets for sync."""
