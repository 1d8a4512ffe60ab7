"""The deployment kit's local mode (`localkit`, run by the Makefile) and the launcher of Redis
and Sentinel processes (`topology`) that the kit, the tests and the benchmarks share.
Standard library only: the kit runs under any python3 >= 3.10."""
