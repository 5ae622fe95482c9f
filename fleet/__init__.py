"""The fleet side: model tools, device registry, cohorts, rollouts and the console."""
