"""Use cases: load aggregates, decide, save atomically; ports for the outside world."""
