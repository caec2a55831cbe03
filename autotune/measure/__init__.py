"""One candidate measured: the jitted kernel call, its check against the reference, its timing, in a child process if
asked, and the baselines it is compared with."""
