"""Multi-process tests: real processes on one SQLite file, SIGKILL, deadline-bounded waits."""
