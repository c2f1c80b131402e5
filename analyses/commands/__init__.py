"""The `federate` subcommands, one module each; each module's `register(subparsers)` adds its
parser and sets `handler(args) -> exit code`.

Exit codes, shared by every subcommand so scripts can branch on them:
0 done; 1 failed (a site or round failed; rerun resumes where possible); 2 bad input or usage;
5 waiting for approval at one or more sites (the requests were sent; rerun after approval).
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_AWAITING_APPROVAL = 5
