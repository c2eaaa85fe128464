"""The command line and what it runs: info, compare, bench, and their timing helpers."""
