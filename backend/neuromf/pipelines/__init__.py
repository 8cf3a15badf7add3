"""Task pipelines over the generic training loop (stage 2's conditional mode; more move here), and a training
run's expected time from its config (`estimates`)."""
