"""Task pipelines over the generic training loop (stage 2's conditional mode; more move here)."""
