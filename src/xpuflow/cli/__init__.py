"""The command line: ``xpuflow info | advise | build | artifacts``."""
