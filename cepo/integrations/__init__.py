"""Drop-ins that run CEPO inside other RL frameworks (imported on demand, never by `cepo`)."""
