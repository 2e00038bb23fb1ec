"""Command-line tools: demo, verify, bench."""
