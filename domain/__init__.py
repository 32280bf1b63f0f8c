"""Palette's domain: event-sourced User, Job and Rule aggregates and the rules they enforce. Pure."""
