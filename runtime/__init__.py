"""gemini-sim's runtime: a torch.distributed training job that checkpoints to CPU memory every iteration,
replicates each machine's checkpoint to the peers a Plan names, persists with DCP, and recovers from the cheapest
tier. It reads gemini_sim only through the Plan (``gemini_sim.plan``)."""
