"""Training: the forward step the pipeline schedules call, and (later) the trainer."""
