"""The exit codes of every orpo-ds command, in one place (the CLI, the launch scripts and the sbatch
requeue logic read the same numbers)."""

EXIT_CONFIG_ERROR = 2  # bad config, bad data or an unsafe output folder, reported without a traceback
EXIT_RUN_ERROR = 3  # the run stopped itself: non-finite losses, a checkpoint it cannot resume, a full disk
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: a checkpoint was saved (or no step had run); requeue and rerun to continue
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
