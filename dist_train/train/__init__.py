"""Building and running a job: the builder (build.py), the loop (loop.py), one optimizer step (step.py),
tasks, evaluation, reporting and the run's outcome (job.py). See docs/architecture.md."""
