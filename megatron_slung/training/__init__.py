"""Arguments, the pretrain loop, DeepSpeed glue, checkpoints, schedules and logging."""
