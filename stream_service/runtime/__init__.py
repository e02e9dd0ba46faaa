"""What holds the processes together: the stage runner, services, supervisor, heartbeats, the run loop."""
