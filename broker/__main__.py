import sys

from broker.lifecycle import end_with_supervisor

end_with_supervisor()  # before anything else runs: a half must never outlive `run`

# structlog formats exceptions with rich wherever rich is installed (as a development tool,
# never a dependency of ours): 5 MB in every process for a traceback's colours (ADR 0029).
sys.modules.setdefault("rich", None)  # type: ignore[arg-type] # None: import refused

from broker.cli import main  # noqa: E402 - after the parent-death signal is set

raise SystemExit(main())
