"""Jobs as QEMU runs them: the state machine, jobs and block jobs, rate limits, the copy engine."""
