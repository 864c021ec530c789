"""The train stage: member plans, the epoch engine, fitted heads, the run summary and lr-find."""
