from broker.lifecycle import end_with_supervisor

end_with_supervisor()  # before anything else runs: a half must never outlive `run`

from broker.cli import main  # noqa: E402 - after the parent-death signal is set

raise SystemExit(main())
