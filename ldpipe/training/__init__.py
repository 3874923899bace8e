"""Training: losses, ldpipe's loop (loop) with probe tracking, on-policy pairs and rewards, resume, optimizer state,
data parallelism, the worker process, TRL runs and the tracking callback for any Trainer, and the run stage (runs)."""
